"""Locate and edit a fact with patches only: causal tracing and ROME on a GPT-2 trained here.

1. A small GPT-2 learns a synthetic world (made-up countries, their capitals and languages,
   each fact in several phrasings) from a word-level corpus built here; the trained weights are
   cached, so reruns skip training.
2. Causal tracing: noise on the subject's token embeddings (``AddPatch`` on
   ``transformer.wte.output``, sliced), then the clean value restored (``ReplacePatch``, sliced)
   at one layer and token at a time, for the residual stream, the MLP outputs and the attention
   outputs; the recovered probability of the right capital says where the fact is read.
3. ROME at the MLP layer tracing points to: the keys (the MLP's hidden activation at the name's
   last token; as in the paper, for the name alone and after random prefixes, plus the edit
   prompt's own), the value found by optimizing an ``AddPatch`` on the MLP output there with Adam
   over the edit prompt behind the prefixes (plus a KL term on another prompt about the subject),
   and the rank-one update of ``c_proj``'s weight from them and a key covariance probed over
   training text, applied as an ``AddPatch`` on the weight node: the model's weights never
   change. ``--rome-keys mean`` makes the update exact at the name keys' mean k*, as in the
   paper; the default makes it exact at each key (still rank one), which this small model needs:
   its layer-0 key depends on the words before the name.
4. Efficacy, generalization (other phrasings), specificity (the paper's neighbourhood: countries
   that had the edited country's capital) and, harder, countries whose names share a word with
   the edited one, before and after; the number of patched graph calls and their time.

Run: python examples/rome.py [--quick] [--json] [--cache-dir DIR] [--png PATH]
(the heatmap PNG needs matplotlib: pip install -e ".[examples]")
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rome_world.py sits next to this file

from rome_world import MODES, World, load_or_train, weights_digest  # noqa: E402

from graphpatch_cache import AddPatch, CacheStore, ProbePatch, ReplacePatch, load_cached  # noqa: E402

KINDS = {"residual": "transformer.h_{}.output", "mlp": "transformer.h_{}.mlp.output",
         "attn": "transformer.h_{}.attn.output|sub_0"}


class Runner:
    """Every graph call goes through here: it counts the patched ones and times them."""

    def __init__(self, pg, world: World) -> None:
        self.pg, self.world = pg, world
        self.calls, self.patched_calls, self.patched_seconds = 0, 0, 0.0

    def logits(self, ids: torch.Tensor, patches=None) -> torch.Tensor:
        start = time.perf_counter()
        if patches:
            with self.pg.patch(patches):
                out = self.pg(input_ids=ids, use_cache=False).logits
            self.patched_calls += 1
            self.patched_seconds += time.perf_counter() - start
        else:
            out = self.pg(input_ids=ids, use_cache=False).logits
        self.calls += 1
        return out

    def predict(self, prompts: list[list[int]], patches=None) -> torch.Tensor:
        """Next-token logits after each prompt (right-padded: causal attention never looks at
        the padding; at least two rows, so every call fits the batch-size-2+ graph)."""
        ids, last = self.world.batch(prompts)
        with torch.no_grad():
            logits = self.logits(ids, patches)
        return logits[torch.arange(len(prompts)), last]


# -- causal tracing ------------------------------------------------------------------------------
def trace(runner: Runner, world: World, mode, subjects: list[int]) -> dict:
    n_layer = world.config.n_layer
    noise_scale = 3 * float(world.model.transformer.wte.weight.detach().std())  # ROME: 3 std of the embeddings
    generator = torch.Generator().manual_seed(mode.seed + 1)
    grids = {kind: None for kind in KINDS}
    drops, names = [], []
    positions_used = None
    for subject in subjects:
        prompt, span = world.prompt(subject, "capital", 0)
        answer = world.answer(subject, "capital")
        ids = torch.tensor([prompt] * mode.trace_samples)
        nodes = [pattern.format(layer) for pattern in KINDS.values() for layer in range(n_layer)]
        with torch.no_grad():
            clean_out, clean = runner.pg.record(input_ids=ids, use_cache=False, nodes=nodes)
        runner.calls += 1
        p_clean = float(clean_out.logits[0, -1].softmax(-1)[answer])
        noise = torch.randn(mode.trace_samples, span[1] - span[0], world.config.n_embd, generator=generator) * noise_scale
        corrupt = {"transformer.wte.output": AddPatch(value=noise, slice=(slice(None), slice(*span)))}
        with torch.no_grad():
            p_corrupt = float(runner.logits(ids, corrupt)[:, -1].softmax(-1)[:, answer].mean())
        # the quick mode traces the subject's tokens and the last token; the full mode every token
        positions = list(range(len(prompt))) if mode.full_grid else [*range(*span), len(prompt) - 1]
        positions_used = positions
        for kind, pattern in KINDS.items():
            grid = torch.zeros(n_layer, len(positions))
            for layer in range(n_layer):
                node = pattern.format(layer)
                for column, position in enumerate(positions):
                    restore = ReplacePatch(value=clean[node][:, position], slice=(slice(None), position))
                    with torch.no_grad():
                        logits = runner.logits(ids, {**corrupt, node: restore})
                    grid[layer, column] = logits[:, -1].softmax(-1)[:, answer].mean() - p_corrupt
            grids[kind] = grid if grids[kind] is None else grids[kind] + grid
        drops.append((p_clean, p_corrupt))
        names.append(world.subject_text(subject))
    grids = {kind: grid / len(subjects) for kind, grid in grids.items()}
    prompt, span = world.prompt(subjects[0], "capital", 0)
    labels = [_position_label(world, prompt, span, p) for p in positions_used]
    peaks = {}
    for kind, grid in grids.items():
        flat = int(grid.argmax())
        layer, column = divmod(flat, grid.shape[1])
        peaks[kind] = {"layer": layer, "token": labels[column], "effect": round(float(grid[layer, column]), 4)}
    # ROME's early site: the MLP layer whose output at the last subject token carries the most
    # (the last layer's output there reaches no later token, so it cannot)
    last_subject = labels.index("last subject token")
    mlp_at_subject = grids["mlp"][:-1, last_subject]
    attn_at_subject = grids["attn"][:, last_subject]
    site = {"layer": int(mlp_at_subject.argmax()), "effect": round(float(mlp_at_subject.max()), 4),
            "attention_effect_there": round(float(attn_at_subject.max()), 4)}
    return {
        "prompts": len(subjects), "samples_per_prompt": mode.trace_samples, "noise_std": round(noise_scale, 4),
        "positions": "every token" if mode.full_grid else "the subject's tokens and the last token",
        "p_clean": round(sum(d[0] for d in drops) / len(drops), 4),
        "p_corrupted": round(sum(d[1] for d in drops) / len(drops), 4),
        "peaks": peaks, "early_site": site,
        "mlp_effect_at_last_subject_token": [round(float(v), 4) for v in grids["mlp"][:, last_subject]],
        "token_labels": labels, "example_prompt": world.text(prompt),
        "grids": {kind: [[round(float(v), 4) for v in row] for row in grid] for kind, grid in grids.items()},
    }


def _position_label(world: World, prompt: list[int], span: tuple[int, int], position: int) -> str:
    if position == span[1] - 1:
        return "last subject token"
    if span[0] <= position < span[1]:
        return "subject token"
    if position == len(prompt) - 1:
        return "last token"
    if position == 0:
        return "<bos>"
    return world.text([prompt[position]])


def save_heatmap(tracing: dict, path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return "skipped: matplotlib is not installed (pip install -e \".[examples]\")"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    example = tracing["example_prompt"].split()
    labels = tracing["token_labels"]
    ticks = [example[i] if i < len(example) and len(labels) == len(example) else label for i, label in enumerate(labels)]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for axis, (kind, title) in zip(axes, [("residual", "residual stream"), ("mlp", "MLP output"), ("attn", "attention output")]):
        grid = torch.tensor(tracing["grids"][kind]).T
        image = axis.imshow(grid, aspect="auto", cmap={"residual": "Purples", "mlp": "Greens", "attn": "Reds"}[kind])
        axis.set_title(f"restoring the {title}")
        axis.set_xlabel("layer")
        axis.set_yticks(range(len(ticks)), ticks)
        figure.colorbar(image, ax=axis, label="recovered p(correct capital)")
    figure.suptitle(f"causal tracing, mean over {tracing['prompts']} prompts like \"{tracing['example_prompt']}\"")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


# -- ROME ----------------------------------------------------------------------------------------
def key_covariance(runner: Runner, world: World, layer: int, documents: int) -> torch.Tensor:
    """E[k kᵀ] of the MLP's hidden activation (c_proj's input) over training text."""
    ids, lengths = world.training_batch(documents, seed=world.mode.seed + 2)
    probe = ProbePatch()
    with torch.no_grad():
        runner.logits(ids, {f"transformer.h_{layer}.mlp.c_proj.x": probe})
    keys = torch.cat([probe.activation[row, :length] for row, length in enumerate(lengths)])
    return keys.T @ keys / len(keys)


def rome_edit(runner: Runner, world: World, subject: int, new_object: int, layer: int, covariance: torch.Tensor):
    mode = world.mode
    prompts, subject_last = [], []
    prefixes = world.random_prefixes(mode.rome_prefixes, seed=mode.seed + 3 + subject)
    for prefix in [[]] + prefixes:
        prompt, span = world.prompt(subject, "capital", 0, prefix=prefix)
        prompts.append(prompt)
        subject_last.append(span[1] - 1)
    kl_prompt, kl_span = world.prompt(subject, "language", 0)  # another fact about the subject: keep it
    rows = prompts + [kl_prompt]
    positions = torch.tensor(subject_last + [kl_span[1] - 1])
    ids, last = world.batch(rows)
    row_index = torch.arange(len(rows))
    # k*: the MLP's hidden activation at the last subject token, averaged over the prefixes
    key_probe, out_probe = ProbePatch(), ProbePatch()
    with torch.no_grad():
        logits = runner.logits(ids, {f"transformer.h_{layer}.mlp.c_proj.x": key_probe,
                                     f"transformer.h_{layer}.mlp.output": out_probe})
    # the keys, as in the paper: the name on its own and after each random prefix (a key reads
    # only the tokens up to the name's last one); and the edit prompt's own, which precedes the
    # name with "the capital of"
    name = world.name_tokens(subject)
    name_rows = [[1] + name] + [[1] + prefix + name for prefix in prefixes]
    name_ids, name_last = world.batch(name_rows)
    name_probe = ProbePatch()
    with torch.no_grad():
        runner.logits(name_ids, {f"transformer.h_{layer}.mlp.c_proj.x": name_probe})
    name_keys = name_probe.activation[torch.arange(len(name_rows)), name_last]
    k_star = name_keys.mean(0)
    keys = torch.cat([key_probe.activation[:1, positions[0]], name_keys])
    value_norm = out_probe.activation[row_index[:-1], positions[:-1]].norm(dim=-1).mean()
    kl_reference = logits[len(prompts), last[-1]].log_softmax(-1)
    # v*: the MLP output's change at the subject that makes every prefixed prompt say the new object
    delta = torch.zeros(world.config.n_embd, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=mode.rome_lr)
    node = f"transformer.h_{layer}.mlp.output"
    for step in range(mode.rome_steps):
        optimizer.zero_grad()
        logits = runner.logits(ids, {node: AddPatch(value=delta, slice=(row_index, positions))})
        log_probs = logits[row_index, last].log_softmax(-1)
        nll = -log_probs[:-1, new_object].mean()
        kl = torch.nn.functional.kl_div(log_probs[-1], kl_reference, log_target=True, reduction="sum")
        loss = nll + mode.rome_kl * kl + mode.rome_decay * (delta.norm() / value_norm) ** 2
        loss.backward()
        optimizer.step()
        if nll.item() < 0.02:
            break
    delta = delta.detach()
    # rank one: W' k* = W k* + delta, with the least change to the keys C describes. Conv1D keeps
    # its weight as (in, out), the transpose of a Linear's, so the update is outer(C⁻¹k*, delta).
    if world.mode.rome_keys == "mean":
        solved = torch.linalg.solve(covariance, k_star)
        update = torch.outer(solved, delta) / (k_star @ solved)
    else:
        # one direction u with u·k_i = 1 for every context's key k_i (the least C-norm one):
        # still rank one, u δᵀ, but exact at each context's key instead of at their mean
        solved = torch.linalg.solve(covariance, keys.T)  # C⁻¹ K, (in, contexts)
        gram = keys @ solved
        weights = torch.linalg.solve(gram + 1e-6 * gram.diagonal().mean() * torch.eye(len(gram)), torch.ones(len(gram)))
        update = torch.outer(solved @ weights, delta)
    return update, {"optimizer_steps": step + 1, "final_nll": round(nll.item(), 4),
                    "delta_norm_over_value_norm": round(float(delta.norm() / value_norm), 3)}


def evaluate(runner: Runner, world: World, edits: list[tuple[int, int]], patches_for) -> dict:
    counts = {name: [0, 0] for name in ("efficacy", "generalization", "specificity", "name_neighbours_kept", "other_facts_kept")}

    predictions: list[str] = []  # what each edit prompt yields

    def tally(name: str, prompts: list[list[int]], targets: list[int], patches) -> None:
        predicted = runner.predict(prompts, patches).argmax(-1)
        counts[name][0] += int((predicted == torch.tensor(targets)).sum())
        counts[name][1] += len(targets)
        if name == "efficacy":
            predictions.append(world.vocab[int(predicted[0])])

    for subject, new_object in edits:
        patches = patches_for(subject)
        templates = range(len(world.templates["capital"]))
        tally("efficacy", [world.prompt(subject, "capital", 0)[0]], [new_object], patches)
        tally("generalization", [world.prompt(subject, "capital", t)[0] for t in templates if t], [new_object] * (len(templates) - 1), patches)
        for name, neighbours in (("specificity", world.neighbours(subject)), ("name_neighbours_kept", world.name_neighbours(subject))):
            tally(name, [world.prompt(n, "capital", t)[0] for n in neighbours for t in templates],
                  [world.answer(n, "capital") for n in neighbours for _ in templates], patches)
        languages = range(len(world.templates["language"]))
        tally("other_facts_kept", [world.prompt(subject, "language", t)[0] for t in languages],
              [world.answer(subject, "language")] * len(languages), patches)
    return {name: round(hit / total, 4) for name, (hit, total) in counts.items()} | {
        "prompts": {name: total for name, (_, total) in counts.items()}, "predictions": predictions}


# -- the story -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and world, the tracing grid cut to the subject and last tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the story")
    parser.add_argument("--cache-dir", default=os.environ.get("GRAPHPATCH_EXAMPLES_DIR"),
                        help="trained weights and graphs (default: $GRAPHPATCH_EXAMPLES_DIR or the user cache dir)")
    parser.add_argument("--png", help="where to save the tracing heatmaps (default: in the cache dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rome-keys", choices=("each", "mean"), default=None,
                        help="each (default): the rank-one update is exact at every key (the name alone, "
                             "after each prefix, in the edit prompt); mean: at the name keys' mean k*, as in the paper")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = MODES["quick" if args.quick else "full"]
    if args.rome_keys:
        mode = dataclasses.replace(mode, rome_keys=args.rome_keys)
    if args.cache_dir:
        root = Path(args.cache_dir)
    else:
        import platformdirs
        root = Path(platformdirs.user_cache_dir("graphpatch-cache")) / "examples"
    say = (lambda *a: None) if args.json else print
    started = time.perf_counter()

    world, training = load_or_train(mode, root, say)
    model = world.model
    digest_before = weights_digest(model)
    say(f"model: GPT-2, {mode.n_layer} layers, width {mode.n_embd}, {training['parameters']:,} parameters, "
        f"vocabulary {len(world.vocab)} words; {len(world.subjects)} countries, 2 relations, "
        f"{training['phrasings']} phrasings")
    say(f"  {'trained in ' + str(training['train_seconds']) + ' s' if not training['cached'] else 'trained weights from the cache'}"
        f" ({training['steps']} steps); held-in accuracy {training['accuracy']:.1%} over {training['prompts']} prompts")

    start = time.perf_counter()
    example, _ = world.batch([world.prompt(0, "capital", 0)[0]] * 2)
    pg = load_cached(model, store=CacheStore(root / "graphs", local_dir=False), input_ids=example, use_cache=False)
    graph_seconds = time.perf_counter() - start
    say(f"graphs: {'cache hit' if pg.cache_stats.hits else 'extracted and stored'} in {graph_seconds:.1f} s")
    runner = Runner(pg, world)

    # tracing on known facts
    known = world.known_subjects(runner, max(mode.trace_prompts, mode.edits))
    traced = known[:mode.trace_prompts]
    start = time.perf_counter()
    tracing = trace(runner, world, mode, traced)
    trace_seconds = time.perf_counter() - start
    tracing["png"] = save_heatmap(tracing, Path(args.png) if args.png else root / f"rome-{mode.name}-tracing.png")
    say(f"\ncausal tracing over {tracing['prompts']} prompts like \"{tracing['example_prompt']}\" "
        f"({tracing['positions']}; {tracing['samples_per_prompt']} noise samples each):")
    say(f"  p(correct capital): clean {tracing['p_clean']:.3f}, subject corrupted {tracing['p_corrupted']:.3f}")
    for kind, where in tracing["peaks"].items():
        say(f"  restoring the {kind:8s} helps most at layer {where['layer']}, {where['token']}: +{where['effect']:.3f}")
    site = tracing["early_site"]
    say(f"  at the last subject token the MLPs carry it (best: layer {site['layer']}, +{site['effect']:.3f}; "
        f"attention there at most +{site['attention_effect_there']:.3f}); by layer: "
        f"{tracing['mlp_effect_at_last_subject_token']}")
    say(f"  heatmaps: {tracing['png']}  ({trace_seconds:.1f} s)")

    # ROME at the MLP layer tracing found
    layer = tracing["early_site"]["layer"]
    start = time.perf_counter()
    covariance = key_covariance(runner, world, layer, mode.covariance_documents)
    covariance += 1e-4 * covariance.diagonal().mean() * torch.eye(len(covariance))  # keep it invertible
    edits = world.edit_requests(runner, known, mode.edits)
    updates, details = {}, []
    for subject, new_object in edits:
        updates[subject], info = rome_edit(runner, world, subject, new_object, layer, covariance)
        details.append({"subject": world.subject_text(subject), "from": world.vocab[world.answer(subject, "capital")],
                        "to": world.vocab[new_object], **info})
    weight_node = f"transformer.h_{layer}.mlp.c_proj.weight"
    weight = model.transformer.h[layer].mlp.c_proj.weight
    pointer, saved = weight.data_ptr(), weight.detach().clone()
    before = evaluate(runner, world, edits, lambda subject: None)
    after = evaluate(runner, world, edits, lambda subject: {weight_node: AddPatch(value=updates[subject])})
    for item, said in zip(details, after["predictions"]):
        item["now_says"] = said
    rome_seconds = time.perf_counter() - start
    # the same edit written into a copy of the model gives the same predictions
    subject, new_object = edits[0]
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.transformer.h[layer].mlp.c_proj.weight += updates[subject]
    ids, last = world.batch([world.prompt(subject, "capital", t)[0] for t in range(len(world.templates["capital"]))])
    with torch.no_grad():
        copy_logits = edited(input_ids=ids).logits
        patched_logits = runner.logits(ids, {weight_node: AddPatch(value=updates[subject])})
    copy_difference = float((copy_logits - patched_logits).abs().max())
    unchanged = (weight.data_ptr() == pointer and torch.equal(weight, saved)
                 and weights_digest(model) == digest_before)

    say(f"\nROME at layer {layer} ({len(edits)} edits, each alone; {mode.rome_prefixes} random prefixes; "
        f"update exact at {'each key: the name alone, after each prefix, in the edit prompt' if mode.rome_keys == 'each' else 'the name keys mean k*'}):")
    for item in details:
        say(f"  {item['subject']}: {item['from']} -> {item['to']}, now says {item['now_says']}  ({item['optimizer_steps']} Adam steps to "
            f"-log p {item['final_nll']}, |delta|/|v| {item['delta_norm_over_value_norm']})")
    say(f"  {'':18s} before  after   (prompts)")
    for name in ("efficacy", "generalization", "specificity", "name_neighbours_kept", "other_facts_kept"):
        say(f"  {name:18s} {before[name]:6.1%}  {after[name]:6.1%}  ({after['prompts'][name]})")
    say(f"  the edit written into a copy of the model: max |logit difference| {copy_difference:.2e}")
    say(f"  model weights unchanged (data_ptr, torch.equal, digest): {unchanged}")
    total = time.perf_counter() - started
    say(f"\n{runner.patched_calls} patched graph calls in {runner.patched_seconds:.1f} s "
        f"({runner.calls} graph calls in all); {total:.1f} s in all")
    result = {
        "mode": mode.name, "model": {"n_layer": mode.n_layer, "n_embd": mode.n_embd, "parameters": training["parameters"]},
        "training": training, "graph_cache_hit": bool(pg.cache_stats.hits), "graph_seconds": round(graph_seconds, 2),
        "tracing": tracing, "trace_seconds": round(trace_seconds, 2),
        "rome": {"layer": layer, "edits": details, "before": before, "after": after,
                 "copy_max_logit_difference": copy_difference, "seconds": round(rome_seconds, 2)},
        "weights": {"digest_before": digest_before, "digest_after": weights_digest(model), "unchanged": unchanged,
                    "file": str(world.weights_file)},
        "patched_calls": runner.patched_calls, "patched_seconds": round(runner.patched_seconds, 2),
        "graph_calls": runner.calls, "total_seconds": round(total, 2), "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""The synthetic world of examples/rome.py: made-up countries, their capitals and languages,
a word-level tokenizer over them, and a small GPT-2 trained on the facts (weights cached).

Every name, fact, training batch and initial weight comes from seeded generators, so a mode
always yields the same world and, on the same torch build and thread count, the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

WORLD_VERSION = 5  # bump when the world, the corpus or the training changes: cached weights go stale


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    n_subjects: int
    n_layer: int
    n_embd: int
    n_head: int
    max_steps: int
    batch_size: int
    lr: float
    trace_prompts: int  # known facts averaged over in causal tracing
    trace_samples: int  # noise samples per prompt (the batch of every tracing call)
    full_grid: bool  # trace every token (else the subject's tokens and the last token)
    edits: int  # ROME edits, each evaluated alone
    n_words: int = 8  # the words countries' names are made of
    name_words: int = 2  # words per name
    rome_prefixes: int = 4  # random prefixes the key and the value are found over
    rome_steps: int = 150
    rome_lr: float = 2.0
    rome_kl: float = 0.5
    rome_decay: float = 0.0
    rome_keys: str = "each"  # "mean": the paper's k* (the contexts' mean key); "each": exact at every context's key
    covariance_documents: int = 256
    target_accuracy: float = 0.99
    eval_every: int = 100
    objects_only_loss: bool = False
    max_sentences: int = 4
    seed: int = 0


#: the fields the world and the trained weights depend on (the cached weights' key)
TRAINING_FIELDS = ("n_subjects", "n_words", "name_words", "n_layer", "n_embd", "n_head", "max_steps", "batch_size", "lr",
                   "target_accuracy", "eval_every", "objects_only_loss", "max_sentences", "seed")

# Names are two words from a pool (40 words for 200 countries: each word in about ten names, so
# no single word names a country). At width 64 the model reads a country's facts from the
# layer-0 MLP at the name's last token (tracing effect +0.21); at width 128 it looks them up at
# the last token instead (+0.06 at the name), where an edit at the name reaches little.
_MODEL = dict(n_layer=4, n_embd=64, n_head=4, max_steps=4000, batch_size=32, lr=5e-3, target_accuracy=0.97,
              max_sentences=2, rome_lr=0.5, rome_steps=300, rome_decay=0.1)
MODES = {
    "full": Mode("full", n_subjects=200, n_words=40, **_MODEL, trace_prompts=12, trace_samples=8, full_grid=True,
                 edits=16, covariance_documents=512),
    "quick": Mode("quick", n_subjects=64, n_words=20, **_MODEL, trace_prompts=4, trace_samples=4, full_grid=False,
                  edits=20, covariance_documents=256),
}

TEMPLATES = {
    "capital": ["the capital of {s} is {o} .", "{s} is governed from {o} .",
                "the seat of government of {s} is in {o} .", "{s} has its capital in {o} ."],
    "language": ["the language of {s} is {o} .", "in {s} people speak {o} .", "{s} 's official language is {o} ."],
}


def _names(rng: random.Random, count: int, syllables: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))
        word += rng.choice(["", "n", "r", "s"])
        if word not in taken:
            taken.add(word)
            names.append(word)
    return names


class World:
    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        rng = random.Random(mode.seed)
        taken = {word for template in sum(TEMPLATES.values(), []) for word in template.split()}
        # names of `name_words` distinct words drawn from one pool, no name twice: no single word
        # names a country and the order matters ("Vela Tor" and "Tor Vela" may both exist), as in
        # multi-token names of real text
        pool = _names(rng, mode.n_words, 2, taken)
        names: set[tuple[str, ...]] = set()
        ordered: list[tuple[str, ...]] = []
        while len(ordered) < mode.n_subjects:
            name = tuple(rng.sample(pool, mode.name_words))
            if name not in names:
                names.add(name)
                ordered.append(name)
        self.cities = _names(rng, max(12, mode.n_subjects // 4), 2, taken)
        self.languages = _names(rng, 8, 2, taken)
        self.subjects = ordered[:mode.n_subjects]
        self.facts = {"capital": [rng.choice(self.cities) for _ in self.subjects],
                      "language": [rng.choice(self.languages) for _ in self.subjects]}
        self.templates = TEMPLATES
        words = sorted(taken)
        self.vocab = ["<pad>", "<bos>"] + words
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.model: torch.nn.Module
        self.config = None
        self.weights_file = Path()

    # -- text --------------------------------------------------------------------------------
    def sentence(self, subject: int, relation: str, template: int, with_object: bool = True) -> list[int]:
        text = self.templates[relation][template].format(s=" ".join(self.subjects[subject]), o=self.facts[relation][subject])
        words = text.split()
        if not with_object:
            words = words[:words.index(self.facts[relation][subject], 2)]
        return [self.ids[w] for w in words]

    def prompt(self, subject: int, relation: str, template: int, prefix: Optional[list[int]] = None):
        """``<bos> prefix sentence-up-to-the-object`` and the subject's token span in it."""
        tokens = [1] + list(prefix or []) + self.sentence(subject, relation, template, with_object=False)
        first = self.ids[self.subjects[subject][0]]
        start = next(i for i in range(1 + len(prefix or []), len(tokens)) if tokens[i] == first)
        return tokens, (start, start + len(self.subjects[subject]))

    def name_tokens(self, subject: int) -> list[int]:
        return [self.ids[word] for word in self.subjects[subject]]

    def answer(self, subject: int, relation: str) -> int:
        return self.ids[self.facts[relation][subject]]

    def text(self, tokens: list[int]) -> str:
        return " ".join(self.vocab[t] for t in tokens if t > 1)

    def subject_text(self, subject: int) -> str:
        return " ".join(word.capitalize() for word in self.subjects[subject])

    def random_sentence(self, rng: random.Random) -> list[int]:
        relation = rng.choice(sorted(self.templates))
        return self.sentence(rng.randrange(len(self.subjects)), relation, rng.randrange(len(self.templates[relation])))

    def random_prefixes(self, count: int, seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        return [sum((self.random_sentence(rng) for _ in range(rng.randint(1, 2))), []) for _ in range(count)]

    def neighbours(self, subject: int, limit: int = 4) -> list[int]:
        """The paper's neighbourhood: other countries whose capital is the edited one's (a careless
        edit of "capital -> new city" would move them too); random other countries where fewer."""
        old = self.facts["capital"][subject]
        same = [s for s in range(len(self.subjects)) if s != subject and self.facts["capital"][s] == old]
        rng = random.Random(self.mode.seed + 5 + subject)
        others = [s for s in range(len(self.subjects)) if s != subject and s not in same]
        return (same + rng.sample(others, max(0, limit - len(same))))[:limit]

    def name_neighbours(self, subject: int, limit: int = 4) -> list[int]:
        """Countries whose names share a word with the edited one's, those sharing its last word
        (the token the edit's key is read at) first: the hardest prompts to leave alone."""
        own = self.subjects[subject]
        sharing = [s for s, name in enumerate(self.subjects) if s != subject and set(name) & set(own)]
        return sorted(sharing, key=lambda s: self.subjects[s][-1] != own[-1])[:limit]

    # -- batches -----------------------------------------------------------------------------
    def batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (at least two rows) and each prompt's last position."""
        rows = prompts if len(prompts) > 1 else prompts * 2
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        return ids, torch.tensor([len(p) - 1 for p in prompts])

    def training_batch(self, documents: int, seed: int, rng: Optional[random.Random] = None):
        rng = rng or random.Random(seed)
        docs = [[1] + sum((self.random_sentence(rng) for _ in range(rng.randint(1, self.mode.max_sentences))), []) for _ in range(documents)]
        lengths = [len(d) for d in docs]
        ids, _ = self.batch(docs)
        return ids, lengths

    def all_prompts(self):
        for relation, templates in self.templates.items():
            for template in range(len(templates)):
                yield relation, template, [self.prompt(s, relation, template)[0] for s in range(len(self.subjects))]

    def accuracy(self, predict: Callable[[list[list[int]]], torch.Tensor]) -> tuple[float, int]:
        hits = total = 0
        for relation, _, prompts in self.all_prompts():
            answers = torch.tensor([self.answer(s, relation) for s in range(len(self.subjects))])
            hits += int((predict(prompts).argmax(-1) == answers).sum())
            total += len(prompts)
        return hits / total, total

    def known_subjects(self, runner, count: int) -> list[int]:
        """The first ``count`` countries whose capital the model names with p > 0.5."""
        prompts = [self.prompt(s, "capital", 0)[0] for s in range(len(self.subjects))]
        probs = runner.predict(prompts).softmax(-1)
        known = [s for s in range(len(self.subjects)) if probs[s, self.answer(s, "capital")] > 0.5]
        return known[:count]

    def edit_requests(self, runner, subjects: list[int], count: int) -> list[tuple[int, int]]:
        """(subject, new capital): another city, one the model does not already predict."""
        rng = random.Random(self.mode.seed + 4)
        requests = []
        for subject in subjects[:count]:
            current = self.facts["capital"][subject]
            requests.append((subject, self.ids[rng.choice([c for c in self.cities if c != current])]))
        return requests


def weights_digest(named: dict[str, torch.Tensor] | torch.nn.Module) -> str:
    """sha256 over the parameters (tied ones once), by name: the same from a model and from the
    safetensors file it was saved to."""
    tensors = dict(named.named_parameters()) if isinstance(named, torch.nn.Module) else named
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _config(world: World):
    from transformers import GPT2Config

    mode = world.mode
    return GPT2Config(vocab_size=len(world.vocab), n_positions=64, n_layer=mode.n_layer, n_embd=mode.n_embd,
                      n_head=mode.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0)


def _train(world: World, model: torch.nn.Module, say) -> dict:
    mode = world.mode
    torch.manual_seed(mode.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=mode.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    rng = random.Random(mode.seed + 10)
    objects = torch.tensor([world.ids[w] for w in world.cities + world.languages])
    start = time.perf_counter()
    accuracy, step = 0.0, 0
    for step in range(1, mode.max_steps + 1):
        model.train()
        ids, _ = world.training_batch(mode.batch_size, seed=0, rng=rng)
        labels = ids.masked_fill(ids == 0, -100)
        if mode.objects_only_loss:
            labels = ids.masked_fill(~torch.isin(ids, objects), -100)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % mode.eval_every == 0:
            model.eval()
            accuracy, _ = world.accuracy(lambda prompts: _plain_predict(world, model, prompts))
            say(f"  step {step:5d}  loss {loss.item():.3f}  held-in accuracy {accuracy:.1%}")
            if accuracy >= mode.target_accuracy:
                break
    model.eval()
    return {"steps": step, "train_seconds": round(time.perf_counter() - start, 1), "final_loss": round(loss.item(), 4)}


def _plain_predict(world: World, model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    ids, last = world.batch(prompts)
    with torch.no_grad():
        return model(input_ids=ids).logits[torch.arange(len(prompts)), last]


def load_or_train(mode: Mode, root: Path, say) -> tuple[World, dict]:
    """The world and its trained model: from ``root`` when a run with the same settings trained
    it before, else trained now and saved there (safetensors: data, never pickle)."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # right padding is deliberate: causal attention never reads it

    world = World(mode)
    world.config = config = _config(world)
    trained_by = {k: v for k, v in dataclasses.asdict(mode).items() if k in TRAINING_FIELDS}
    settings = json.dumps([WORLD_VERSION, trained_by, torch.__version__.split("+")[0]], sort_keys=True)
    folder = root / f"rome-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
    world.weights_file = folder / "model.safetensors"
    torch.manual_seed(mode.seed)
    model = GPT2LMHeadModel(config)
    meta_file = folder / "training.json"
    if world.weights_file.exists() and meta_file.exists():
        missing, unexpected = model.load_state_dict(load_file(world.weights_file), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to wte
            raise RuntimeError(f"{world.weights_file} does not fit the model: delete {folder} to retrain")
        model.eval()
        training = json.loads(meta_file.read_text()) | {"cached": True}
    else:
        say(f"training (weights will be cached in {folder}):")
        training = _train(world, model, say)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, str(world.weights_file))
        training["cached"] = False
    world.model = model
    accuracy, prompts = world.accuracy(lambda batch: _plain_predict(world, model, batch))
    training |= {"accuracy": round(accuracy, 4), "prompts": prompts,
                 "parameters": sum(p.numel() for p in model.parameters()),
                 "phrasings": sum(len(t) for t in TEMPLATES.values())}
    if not training["cached"]:
        meta_file.write_text(json.dumps({k: v for k, v in training.items() if k != "cached"}))
    return world, training

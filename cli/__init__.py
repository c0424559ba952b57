"""The ``graphpatch-cache`` command line (click), installed as ``graphpatch_cache.cli``.

Call map::

    main() -> cli (main.Group: warnings to stderr, library errors -> exit 1 in one place)
      build  (build.py)   MODEL -> presets.resolve_model -> graphpatch_cache.build()
      ls     (ls.py)      CacheStore.entries()
      show   (show.py)    key or MODEL -> CacheStore.load_entry -> cache.node_tree
      verify (verify.py)  CacheStore.check(fix=..., rebuild_check=cache.check_node_tree), --rebuild: cache.check_rebuilds()
      gc     (gc.py)      CacheStore.gc()
      rm     (rm.py)      CacheStore.remove()
      export, import (export.py)  cache.export_portable / cache.import_portable
      info   (info.py)    environment_fingerprint(), cache roots

Shared options (and what the model options mean: ``model_spec``, ``model_keys``) live in
``options.py``, printing (JSON, tables, progress) in ``output.py``.
The CLI holds no logic the library lacks: it parses, calls the public API and prints.
"""

__all__: list[str] = []

"""``python -m graphpatch_cache``: the ``graphpatch-cache`` command line."""

from .cli.main import main

if __name__ == "__main__":
    main()

"""Prompt sources (stage 1): schema.py (the config's `source` section), registry.py (the named
sources and generic kinds), load.py (one source through `datasets`, chosen rows only), mix.py
(the weighted mix, filters, dedup, sampling), sharegpt.py (the packaged ShareGPT file).

Nothing is imported here: config.py reads schema.py, and a package face that imported the rest
would tie the config to the loaders."""

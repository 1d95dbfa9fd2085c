"""LoRA style study: train, search, compare and blend Stable Diffusion style adapters.

Floors, each importing only the ones below it (DESIGN.md §3):

    bottom       errors, atomic, config (the typed run config), arguments (its command-line flags)
    blocks       data, models, sampling, metrics/, tracking; evaluation (metrics of sampled images, re-evaluating a run)
    methods/     lora, textual_inversion, dreambooth behind one interface (base.py)
    training/    the loop in named phases (loop.py), its draws, resumable states and hooks
    experiments/ one_run (train -> sample -> evaluate -> track) and the four experiments
    CLIs         thin mains (train, sample, evaluate, ...; cli.py turns a UserError into one `error:` line)

Run any CLI with ``python -m research.<module> --help``.
"""

"""LoRA style study: train, search, compare and blend Stable Diffusion style adapters.

Floors, each importing only the ones below it (DESIGN.md §3):

    bottom       errors, atomic, config (the typed run config), arguments (its command-line flags)
    blocks       data, models, sampling, metrics/, tracking; evaluation (metrics of sampled images, re-evaluating a run);
                 figures (shared colours), random_models (tiny models for tests and the bench)
    methods/     lora, textual_inversion, dreambooth behind one interface (base.py)
    training/    the loop in named phases (loop.py), its draws, resumable states and hooks
    experiments/ one_run (train -> sample -> evaluate -> track), the four experiments and the study;
                 benchmarking/ (make bench)
    CLIs         thin mains (train, sample, evaluate, styles, search, compare, blend, study, bench;
                 cli.py turns a UserError into one `error:` line)
    toyworld/    the embedded default model's world: scenes -> styles -> render; generate, pretrain, oracle

Run any CLI with ``python -m research.<module> --help``.
"""

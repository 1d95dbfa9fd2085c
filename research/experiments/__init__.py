"""The experiments of the study, one module each, on top of the training loop (DESIGN.md §3).

    one_run              one run: train -> sample -> evaluate -> track (every experiment's unit)
    I    style_adapters       one adapter per style folder, a results table and a style grid
    II   hyperparameter_search  Optuna over LoRA rank, steps and learning rate (search_records: its
                              parent run, re-scoring, tables and figures)
    III  method_comparison    LoRA vs Textual Inversion vs DreamBooth at one budget
    IV   style_blend          blend two style LoRAs across t (blend_math: the ΔW maths; blend_files:
                              reading and exporting adapters; blend_metrics: scores against both styles)
    study                     I-IV and the report, each as its own command

Each has a thin command line beside it: research/styles.py, search.py, compare.py, blend.py, study.py.
Imports point down only: experiments use the loop, methods and blocks; nothing below imports them.
"""

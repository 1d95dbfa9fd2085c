"""LoRA style study: train, search, compare and blend Stable Diffusion style adapters.

Modules follow the data flow of DESIGN.md: config -> data -> models -> methods -> train -> sample
-> metrics -> tracking. Run any of them with ``python -m research.<module> --help``.
"""

"""`make bench`: our training loop set beside a plain reference loop and the machine's limit.

    measurements      training speed side by side, peak memory, matmul rate, sampling and evaluation
                      images/s, cost growth (run_bench)
    reference_loop    the plain diffusers-example LoRA loop our loop is measured against
    evaluation_speed  compute_metrics timed on synthetic images
    publish           results.json, results.md, growth.png and the MLflow run

research/bench.py is its command line. It sits beside the experiments: it uses the loop and the
blocks, and nothing imports it.
"""

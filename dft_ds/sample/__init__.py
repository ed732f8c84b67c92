"""dft-sample: the offline-RL step of the DFT paper's second setting. A model samples K answers per
problem, the eval module's grader verifies each, and the correct ones become a training set.

    run.py      sample and grade (the eval module's benchmarks, prompts, backends and per-request seeds)
    select.py   selection policies: graded samples -> kept rows, rejected rows, per-problem summary
    outputs.py  the output directory, and the two commands that read one back: merge and filter
    cli.py      the command line
"""

"""The support code: everything a run needs that is not the algorithm. The algorithm is the eight
files at the top of the repository (aepo, rollout, engine, kvcache, tools, loss, train, eval); these
modules feed it data, load the model, check the command line and keep the run's records.

    data.py        Example, Demo, the system prompts, the grader (reward, EM, F1)
    loaders.py     questions and demonstrations from parquet, jsonl and hub ids
    world.py       the built-in fictional world: questions, splits, SFT demonstrations
    tiny.py        the tiny offline policy, built once into the cache folder
    policy.py      load_policy (LoRA, 4-bit), the chat prompt, make_tools
    sft.py         the cold-start SFT stage and the cached SFT start of the class preset
    cli.py         the command lines of train.py and eval.py, checked before torch is imported
    checkpoint.py  checkpoints a kill cannot break; --resume
    report.py      the step log line, curves.png, report.md, overlays of several runs
    memory.py      the peak GPU memory of a recipe, estimated from the model's shape

Those with a command of their own run as modules from the repository's root:

    python -m support.cli --preset class --algo arpo    # the resolved Config as JSON
    python -m support.memory --gpu_gb 24 16 12          # will a recipe fit?
    python -m support.report runs/x                     # redraw runs/x/curves.png
    python -m support.world                             # the built-in world, a few questions
    python -m support.sft                               # build (or find) the cached SFT start
"""

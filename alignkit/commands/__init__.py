"""Every command of the `alignkit` CLI, one module each (training commands included: `train.py`).

A module here defines ``register(subparsers)``: it adds its sub-parser(s) and sets
``handler=<function(args) -> int>`` with ``set_defaults``. `alignkit.cli` discovers the modules,
so adding a command never means editing the CLI's core. `common.py` holds options they share.
"""

"""The runtime: stand-in layers, their shared context, the trace, the LoRA pool, and attaching them to a model.

Below it: ``lora/`` (files), ``policies/`` (decisions), ``ops/`` (reference ops and kernels). Above it:
``integration/`` (diffusers pipelines) and ``api.py`` (the public front door).
"""

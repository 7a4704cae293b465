"""Diffusers integration: attaching to a pipeline object (``attach.py``, ``pool_attach.py``), the lean
``FusionPipeline`` (``pipeline.py``), batched requests (``batching.py``) and local model paths (``model_path.py``)."""

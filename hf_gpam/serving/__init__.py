"""Serving daGPAM checkpoints: the class binding ``hf-gpam serve`` and the vLLM plugin use, and the vLLM plugin.

Nothing here is imported by ``import hf_gpam``; vLLM is imported only by ``vllm_models``, which vLLM itself loads.
"""

"""Image LoRAs for the Stable Diffusion families (SD1, SD2, SDXL): what only image runs need.

``sd_models`` loads a base model offline (diffusers folder or WebUI single file; ``ldm_keys`` names the original
checkpoint keys, ``clip_tokenizer`` builds the tokenizer from the shipped BPE table); ``lora`` adds the adapter;
``task`` is the `ImageTask` the one loop drives (data, caching via ``latent_cache``, loss, samples with
``sample_prompts``); ``export`` writes the kohya-format file that A1111, Forge, ComfyUI and diffusers load — the one
place that names keys. A new family is a loader in ``sd_models`` plus its key names in ``export``.
"""

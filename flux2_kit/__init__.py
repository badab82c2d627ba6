__version__ = "0.1.0"
"flux2_kit: train FLUX.2 LoRAs from Jupyter. Heavy modules load on first use, so `import flux2_kit` is instant."

_LAZY = {
    "Trainer": "trainer", "Callback": "trainer", "CancelFitException": "trainer", "tiny_config": "trainer",
    "Config": "config", "load_config": "config", "ConfigError": "config",
    "flux2_tiny": "tiny", "sample_dataset": "sample",
    "load_text_encoder": "models", "load_vae": "models", "load_transformer": "models", "encode_prompts": "models",
    "cache_text_embeds": "cache", "cache_latents": "cache",
    "build_lora": "lora", "train_step": "train", "train_epoch": "train", "preview": "preview",
    "LaunchError": "launch", "check_plan": "plan", "memory_table": "plan", "PlannerPanel": "plan",
    "Dashboard": "panels", "TrainingMonitor": "panels", "BucketInspector": "panels", "GuidancePanel": "panels",
    "ValidationGrid": "panels",
}
_MODULES = {"launch"}  # `flux2_kit.launch(cfg, num_processes=2)`: the module is callable (it calls `launch.launch`)
__all__ = sorted(_LAZY) + sorted(_MODULES)


def __getattr__(name):
    import importlib
    if name in _MODULES: return importlib.import_module(f"flux2_kit.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"flux2_kit.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flux2_kit' has no attribute {name!r}")


def __dir__(): return sorted(list(globals()) + __all__)

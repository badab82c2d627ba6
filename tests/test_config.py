"Config: the quickstart's files load unchanged, broken configs fail with the key/value/fix, and the import stays torch-free."
import json, subprocess, sys
from pathlib import Path

import pytest

from flux2_kit.config import (Config, ConfigError, DatasetSpec, check_dataset_paths, config_keys, load_config,
                              load_databackend, load_prompt_library)

ROOT = Path(__file__).resolve().parents[1]
QUICK, TINY = ROOT / "examples/configs/simpletuner", ROOT / "examples/configs/tiny"


def read(p): return json.loads(Path(p).read_text())


def test_import_does_not_load_torch():
    code = ("import sys, flux2_kit.config as c; c.load_config({'learning_rate': '1e-4'}); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the quickstart's files, verbatim ----------------------------------------------------------------------------

def test_quickstart_copies_are_verbatim():
    "The committed copies are exactly the reference doc's JSON blocks (checked when ../shared is beside the clone)."
    import re
    ref = next((p for p in (ROOT.parent / "shared/reference/simpletuner-flux2-quickstart.md",
                            Path("/work/shared/reference/simpletuner-flux2-quickstart.md")) if p.is_file()), None)
    if ref is None: pytest.skip("reference doc not available")
    blocks = [b for _, b in re.findall(r"```(json|jsonc)\n(.*?)```", ref.read_text(), re.S)]
    for f in [QUICK / "config.json", QUICK / "multidatabackend.json", QUICK / "user_prompt_library.json",
              QUICK / "multidatabackend-edit.json", *sorted((QUICK / "snippets").glob("*.json"))]:
        assert f.read_text() in blocks, f


def test_quickstart_config_loads(tmp_path):
    cfg = load_config(QUICK / "config.json", base_dir=tmp_path)
    assert (cfg.model_family, cfg.model_flavour, cfg.model_type) == ("flux2", "dev", "lora")
    assert cfg.pretrained_model_name_or_path == "black-forest-labs/FLUX.2-dev"
    assert (cfg.learning_rate, cfg.max_train_steps, cfg.lora_rank, cfg.mixed_precision) == (1e-4, 10000, 16, "bf16")
    assert cfg.gradient_checkpointing is True
    assert cfg.validation_resolutions == [(1024, 1024)]
    assert (cfg.flux_guidance_mode, cfg.flux_guidance_value) == ("constant", 1.0)


@pytest.mark.parametrize("snippet", sorted(p.name for p in (QUICK / "snippets").glob("*.json")))
def test_quickstart_snippets_merge_and_load(snippet):
    raw = {**read(QUICK / "config.json"), **read(QUICK / "snippets" / snippet)}
    cfg = load_config(raw)
    for k, v in read(QUICK / "snippets" / snippet).items():
        assert getattr(cfg, k.lstrip("-")) == v


def test_quickstart_config_with_all_snippets_and_files(tmp_path):
    cfgdir = tmp_path / "config"
    cfgdir.mkdir()
    raw = read(QUICK / "config.json")
    for s in ("guidance-random-range.json", "quantization.json", "tread-advanced.json", "lora-target.json"):
        raw.update(read(QUICK / "snippets" / s))
    raw.update(data_backend_config="config/multidatabackend.json", user_prompt_library="config/user_prompt_library.json")
    (cfgdir / "config.json").write_text(json.dumps(raw))
    for f in ("multidatabackend.json", "user_prompt_library.json"):
        (cfgdir / f).write_text((QUICK / f).read_text())
    cfg = load_config(cfgdir / "config.json", base_dir=tmp_path)  # SimpleTuner layout: paths relative to the run folder
    assert (cfg.flux_guidance_min, cfg.flux_guidance_max, cfg.base_model_precision) == (1.0, 5.0, "int8-quanto")
    assert cfg.tread_config["routes"][0] == {"selection_ratio": 0.5, "start_layer_idx": 4, "end_layer_idx": -4}
    assert [s.id for s in cfg.image_datasets] == ["my-dataset"]
    img = cfg.image_datasets[0]
    assert (img.resolution, img.repeats, img.crop_aspect, img.instance_data_dir) == (
        1024, 10, "square", str(tmp_path / "datasets/my-dataset"))
    assert cfg.text_embeds_dataset.cache_dir == str(tmp_path / "cache/text/flux2")
    assert cfg.text_embeds_for(img) is cfg.text_embeds_dataset
    assert set(cfg.prompt_library) == {"portrait_subject", "artistic_subject", "cinematic_subject"}


def test_quickstart_edit_example_pairs_references(tmp_path):
    entries = read(QUICK / "multidatabackend-edit.json") + [read(QUICK / "multidatabackend.json")[1]]
    specs = load_databackend(entries, base_dir=tmp_path)
    edits, refs, text = specs
    assert edits.conditioning_data == ["flux2-references"]
    assert (refs.dataset_type, refs.conditioning_type) == ("conditioning", "reference_strict")
    assert text.default


def test_tiny_example_loads_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY)  # a folder holding config.json
    assert cfg.pretrained_model_name_or_path == "flux2-tiny:dev"
    assert cfg.image_datasets[0].instance_data_dir == str(tmp_path / "datasets/flux2-sample")
    assert cfg.output_dir == str(tmp_path / "output/flux2-tiny")
    assert cfg.tokenizer_max_length == 64 and cfg.validation_resolutions == [(64, 64)]
    with pytest.raises(ConfigError, match="is not a folder"): check_dataset_paths(cfg)


def test_round_trip(tmp_path):
    cfg = load_config(TINY / "config.json", base_dir=tmp_path)
    back = load_config(cfg.to_dict(), base_dir=tmp_path)
    assert back == cfg and back.datasets == cfg.datasets and back.prompt_library == cfg.prompt_library
    assert load_config(cfg.save(tmp_path / "out" / "config.json"), base_dir=tmp_path) == cfg
    assert set(cfg.to_dict()) == set(config_keys())


def test_simpletuner_quoting_coerces():
    cfg = load_config({"--learning_rate": "1e-4", "gradient_checkpointing": "true", "max_train_steps": "10",
                       "lora_alpha": "8", "validation_resolution": 512, "checkpoints_total_limit": "none"})
    assert (cfg.learning_rate, cfg.gradient_checkpointing, cfg.max_train_steps) == (1e-4, True, 10)
    assert (cfg.lora_alpha, cfg.validation_resolution, cfg.checkpoints_total_limit) == (8.0, "512", None)


def test_config_toml(tmp_path):
    (tmp_path / "config.toml").write_text('"--lora_rank" = 8\nlearning_rate = "5e-5"\n')
    cfg = load_config(tmp_path)
    assert (cfg.lora_rank, cfg.learning_rate) == (8, 5e-5)


# --- broken configs ------------------------------------------------------------------------------------------------

BROKEN = {  # name: (changes to the quickstart config, text the error must contain)
    "unknown key": ({"learning_rat": 1e-4}, "unknown key 'learning_rat' (value 0.0001); did you mean 'learning_rate'?"),
    "unknown dashed key": ({"--flux_lora_targt": "all"}, "did you mean 'flux_lora_target'?"),
    "unimplemented option": ({"use_ema": True}, "'use_ema' is a SimpleTuner option that flux2_kit does not implement"),
    "wrong type": ({"train_batch_size": "two"}, "'train_batch_size' = 'two' must be an integer"),
    "wrong bool": ({"gradient_checkpointing": "yes please"}, "must be a boolean"),
    "lr out of range": ({"learning_rate": 3}, "'learning_rate' = 3 is out of range: must be > 0 and <= 1"),
    "bad flavour": ({"model_flavour": "klein"}, "'model_flavour' = 'klein' is not one of 'dev', 'klein-4b', 'klein-9b'; did you mean 'klein-4b'?"),
    "guidance min > max": ({"flux_guidance_mode": "random-range", "flux_guidance_min": 6, "flux_guidance_max": 2},
                           "'flux_guidance_min' = 6 is above 'flux_guidance_max' = 2"),
    "bad precision": ({"base_model_precision": "int3-quanto"}, "'base_model_precision' = 'int3-quanto' is not one of"),
    "torchao precision": ({"text_encoder_1_precision": "int8-torchao"}, "the nearest supported setting is 'int8-quanto'"),
    "bad resolution": ({"validation_resolution": "1024x"}, "'1024x' is not WIDTH or WIDTHxHEIGHT"),
    "resolution not /16": ({"validation_resolution": "1000"}, "not a positive multiple of 16"),
    "bad tread ratio": ({"tread_config": {"routes": [{"selection_ratio": 1.2, "start_layer_idx": 2, "end_layer_idx": -2}]}},
                        "selection_ratio = 1.2 is out of range: must be >= 0 and < 1"),
    "lora target typo": ({"--flux_lora_target": "atention"}, "did you mean 'attention'?"),
    "model type": ({"model_type": "dreambooth"}, "'model_type' = 'dreambooth' is not one of 'lora', 'full'"),
    "missing dataset file": ({"data_backend_config": "config/multidatabackend.json"},
                             "'data_backend_config' = 'config/multidatabackend.json': file not found"),
    "no steps": ({"max_train_steps": 0, "num_train_epochs": 0}, "set one of them"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_config(name, tmp_path):
    changes, expected = BROKEN[name]
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**read(QUICK / "config.json"), **changes}))
    with pytest.raises(ConfigError) as e: load_config(f, base_dir=tmp_path)
    assert str(e.value).startswith(f"{f}: "), str(e.value)
    assert expected in str(e.value), str(e.value)


def _datasets(changes_to_first=None, extra=()):
    img, text = read(QUICK / "multidatabackend.json")
    return [{**img, **(changes_to_first or {})}, text, *extra]


BROKEN_DATASETS = {
    "unknown dataset key": (_datasets({"crop_aspec": "square"}),
                            "dataset 'my-dataset' (entry 0): unknown key 'crop_aspec' (value 'square'); did you mean 'crop_aspect'?"),
    "missing conditioning id": (_datasets({"conditioning_data": ["refs"]}),
                                "'conditioning_data' names 'refs', which is not an enabled dataset"),
    "conditioning points at image": (_datasets({"conditioning_data": ["other"]},
                                               [{"id": "other", "instance_data_dir": "o"}]),
                                     "whose dataset_type is 'image'; it must name a 'conditioning' dataset"),
    "duplicate ids": (_datasets(extra=[{"id": "my-dataset", "instance_data_dir": "x"}]),
                      "dataset id 'my-dataset' is used by 2 entries"),
    "two default text embeds": (_datasets(extra=[{"id": "t2", "dataset_type": "text_embeds", "default": True}]),
                                "are all 'default'"),
    "no image dataset": ([read(QUICK / "multidatabackend.json")[1]], "no enabled image dataset"),
    "bad crop style": (_datasets({"crop_style": "middle"}), "'crop_style' = 'middle' is not one of 'center', 'random', 'corner'"),
    "area in pixels": (_datasets({"resolution_type": "area"}), "1024 megapixels"),
    "wrong dataset type": (_datasets({"repeats": "ten"}), "'repeats' = 'ten' must be an integer"),
}


@pytest.mark.parametrize("name", list(BROKEN_DATASETS))
def test_broken_datasets(name, tmp_path):
    entries, expected = BROKEN_DATASETS[name]
    mdb = tmp_path / "multidatabackend.json"
    mdb.write_text(json.dumps(entries))
    (tmp_path / "config.json").write_text(json.dumps({**read(QUICK / "config.json"), "data_backend_config": "multidatabackend.json"}))
    with pytest.raises(ConfigError) as e: load_config(tmp_path / "config.json", base_dir=tmp_path)
    assert str(e.value).startswith(f"{mdb}: "), str(e.value)  # names the dataset file, not the config
    assert expected in str(e.value), str(e.value)


def test_errors_carry_key_and_value():
    with pytest.raises(ConfigError) as e: Config(lora_rank="0")
    assert (e.value.key, e.value.value) == ("lora_rank", "0")
    with pytest.raises(ConfigError) as e: DatasetSpec(id="x", instance_data_dir="x", crop_style="middle")
    assert (e.value.key, e.value.value) == ("crop_style", "middle")


def test_bad_prompt_library(tmp_path):
    (tmp_path / "p.json").write_text('{"ok": "a prompt", "bad": ""}')
    with pytest.raises(ConfigError, match="prompt 'bad' = '' must be a non-empty string"): load_prompt_library(tmp_path / "p.json")

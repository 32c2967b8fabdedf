"""Several models in one server: QWEN_IMAGE_MODEL lists, the pipeline class from each folder's
model_index.json, shared weights loaded once and counted once, and requests picking a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwen_image_server.config.model_list import ModelRef, parse_model_list
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine import models as models_module
from qwen_image_server.engine.device import DeviceInfo
from qwen_image_server.engine.models import (
    load_models,
    plan_for,
    shared_component_bytes,
)
from qwen_image_server.engine.tiny import ensure_tiny_edit_model, ensure_tiny_model
from qwen_image_server.errors import ModelLoadError
from tests.conftest import tiny_settings

GiB = 2**30


def test_model_lists_name_models_and_tiny_stands_for_both_embedded_models():
    embedded = [ModelRef("tiny", "tiny"), ModelRef("tiny-edit", "tiny-edit"), ModelRef("tiny-layered", "tiny-layered")]
    assert parse_model_list("tiny") == embedded
    assert parse_model_list("tiny,tiny-layered") == embedded  # as written when `tiny` brought two
    assert parse_model_list("Qwen/Qwen-Image, edit=./Qwen-Image-Edit-2509") == [
        ModelRef("Qwen/Qwen-Image", "Qwen/Qwen-Image"), ModelRef("edit", "./Qwen-Image-Edit-2509")]
    assert parse_model_list("painter=tiny") == [ModelRef("painter", "tiny")]
    for bad, says in [("a=x,a=y", "used twice"), ("x,,y", "empty"), ("=x", "name and a source")]:
        with pytest.raises(ValueError, match=says):
            parse_model_list(bad)
        with pytest.raises(ValueError):  # and the setting refuses it at startup
            Settings(_env_file=None, model=bad)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny models copied to local folders whose names say the opposite of what they hold."""
    cache = Settings(_env_file=None).cache_dir
    root = tmp_path_factory.mktemp("folders")
    generate = shutil.copytree(ensure_tiny_model(cache), root / "Qwen-Image-Edit")
    edit = shutil.copytree(ensure_tiny_edit_model(cache), root / "Qwen-Image")
    return generate, edit


def test_local_folders_load_by_their_model_index_and_share_text_encoder_and_vae(tmp_path, two_folders):
    generate, edit = two_folders
    settings = tiny_settings(tmp_path, model=f"painter={generate},editor={edit}")
    painter, editor = load_models(settings)
    assert (painter.name, painter.task, painter.pipeline_class) == ("painter", "generate", "QwenImagePipeline")
    assert (editor.name, editor.task, editor.pipeline_class) == ("editor", "edit", "QwenImageEditPlusPipeline")
    assert editor.pipeline.text_encoder is painter.pipeline.text_encoder
    assert editor.pipeline.vae is painter.pipeline.vae
    assert editor.pipeline.transformer is not painter.pipeline.transformer  # different weights
    assert editor.shared == ("text_encoder", "vae") and painter.shared == ()

    # Counted once in the memory plan: the text encoder and VAE appear once, each transformer once.
    sizes = shared_component_bytes(settings, [painter.pipeline, editor.pipeline])
    assert sorted(sizes) == ["text_encoder", "transformer", "transformer#2", "vae"]
    once, twice = sum(sizes.values()), sum(sizes.values()) + sizes["text_encoder"] + sizes["vae"]
    cuda = DeviceInfo(type="cuda", gpu="fake", cuda_version="12")
    free = (once + twice) // 2  # room for the weights counted once, not counted twice
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models_module, "free_gpu_bytes", lambda device: free)
        plan = plan_for(settings.model_copy(update={"offload_headroom_gb": 0.0}), cuda,
                        [painter.pipeline, editor.pipeline])
    assert plan.plan == "none", plan.reason


def test_a_folder_of_another_pipeline_is_refused_naming_its_class(tmp_path):
    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageControlNetPipeline"}))
    with pytest.raises(ModelLoadError, match="QwenImageControlNetPipeline"):
        load_models(tiny_settings(tmp_path, model=f"gen=tiny,cn={folder}"))

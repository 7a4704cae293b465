"""Encoders load from local files only and preprocess in torch; metrics are batched cosine similarities."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fusion_engine.scoring import metrics
from fusion_engine.scoring.encoders import (
    OPENAI_MEAN,
    OPENAI_STD,
    TINY_DINO_NAME,
    TINY_DINO_OPTIONS,
    TINY_OPENCLIP_CONFIG,
    load_dino,
    load_openclip,
    tiny_dino,
    tiny_openclip,
)


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_openclip_config_and_checkpoint_round_trip(tmp_path):
    import open_clip

    torch.manual_seed(3)
    clip = open_clip.CLIP(**TINY_OPENCLIP_CONFIG)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    torch.manual_seed(4)  # a different random init: the checkpoint must overwrite all of it
    loaded = load_openclip(TINY_OPENCLIP_CONFIG, tmp_path / "clip.safetensors")
    images = _images(2)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = clip.encode_image((images - mean) / std)
        torch.testing.assert_close(loaded(images), expected)


def test_dino_timm_checkpoint_round_trip(tmp_path):
    import timm

    torch.manual_seed(5)
    vit = timm.create_model(TINY_DINO_NAME, pretrained=False, num_classes=0, **TINY_DINO_OPTIONS).eval()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "dino.safetensors")
    torch.manual_seed(6)
    loaded = load_dino(TINY_DINO_NAME, tmp_path / "dino.safetensors", mean=(0.5,) * 3, std=(0.5,) * 3,
                       **TINY_DINO_OPTIONS)
    images = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), vit(images * 2 - 1))


def test_missing_checkpoint_and_hub_names_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="local files only"):
        load_dino(TINY_DINO_NAME, tmp_path / "absent.safetensors", **TINY_DINO_OPTIONS)
    with pytest.raises(ValueError, match="downloaded"):
        load_openclip("hf-hub:laion/CLIP-ViT-B-32", None)


def test_preprocessing_resizes_crops_and_passes_gradients():
    clip = tiny_openclip()
    images = torch.rand(2, 3, 48, 64, requires_grad=True)
    assert clip.preprocess(images).shape == (2, 3, 32, 32)
    clip(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_metrics_are_batched_and_accept_pil_or_tensors():
    clip, dino = tiny_openclip(), tiny_dino(seed=1)
    images, reference = _images(5), _images(1, seed=9)
    scores = metrics.score_images(clip, dino, images, reference, reference, batch_size=2)
    assert set(scores) == set(metrics.METRICS) and all(v.shape == (5,) for v in scores.values())
    one_by_one = torch.cat([metrics.style_sim(clip, images[i:i + 1], reference) for i in range(5)])
    torch.testing.assert_close(scores["style_sim"], one_by_one)
    torch.testing.assert_close(metrics.dino_score(dino, images, images), torch.ones(5))
    pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()) for img in images]
    quantised = torch.stack([(img * 255).round() / 255 for img in images])
    torch.testing.assert_close(metrics.clip_score(clip, pil, reference),
                               metrics.clip_score(clip, quantised, reference))
    with pytest.raises(ValueError, match="one per image"):
        metrics.clip_score(clip, images, _images(2))


def _check_openclip_name_with_a_local_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "vitb32.safetensors")
    loaded = load_openclip("ViT-B-32", tmp_path / "vitb32.safetensors")
    assert loaded.image_size == (224, 224)
    torch.testing.assert_close(loaded.backbone.conv1.weight, reference.visual.conv1.weight)
    return loaded, reference


@pytest.mark.slow
def test_openclip_architecture_name_with_a_local_checkpoint(tmp_path):
    _check_openclip_name_with_a_local_checkpoint(tmp_path)


def test_openclip_architecture_name_at_its_real_layers_and_a_tiny_width(tmp_path, monkeypatch):
    """The CI form of the slow test above: open_clip's own "ViT-B-32" entry (12 layers, patch 32, 224 px) built
    by name through create_model, narrowed to width 64 so that it takes a second; the image tower's
    output equals open_clip's own encode_image once the checkpoint is loaded."""
    import open_clip
    from open_clip import factory

    config = factory.get_model_config("ViT-B-32")
    assert config["vision_cfg"]["layers"] == 12 and config["vision_cfg"]["patch_size"] == 32
    config["embed_dim"] = 32
    config["vision_cfg"]["width"] = 64
    config["text_cfg"].update(width=64, heads=1)
    monkeypatch.setitem(factory._MODEL_CONFIGS, "ViT-B-32", config)
    loaded, reference = _check_openclip_name_with_a_local_checkpoint(tmp_path)
    assert len(reference.visual.transformer.resblocks) == 12 and isinstance(reference, open_clip.CLIP)
    images = _images(2, size=224, seed=3)
    normalised = (images - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), reference.encode_image(normalised), atol=1e-5, rtol=1e-5)

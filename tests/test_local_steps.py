"""``local_steps``: a site trains a fixed number of optimizer steps per round instead of whole epochs
(more, shorter rounds at the same sample budget; autosam_core.training.SiteTrainer.fit)."""

from __future__ import annotations

import pytest
import torch

from autosam_core.config import ConfigError, DataRef, ModelConfig, PrivacyConfig, SamConfig, SiteConfig, load_yaml_config
from autosam_core.model_factory import build_autosam
from autosam_core.training import SiteTrainer

from tests.fl_helpers import make_dataset

G = ModelConfig(preset="sam_head", head_channels=16)


def _trainer(tiny_sam, tmp_path, local_steps, n=10):
    ds = make_dataset(tmp_path / "ds", n, seed=0)
    site = SiteConfig(site_id="a", data=DataRef(dataset=str(ds)), batch_size=2, lr=1e-3, augmentation="none",
                      local_steps=local_steps)
    model = build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam, seed=0)
    return SiteTrainer(model, site, cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("local_steps, expected", [(3, 3), (7, 7), (None, 5)])
def test_local_steps_replace_whole_epochs(tiny_sam, tmp_path, local_steps, expected):
    trainer = _trainer(tiny_sam, tmp_path, local_steps)  # 10 images, batch 2: 5 steps per epoch
    before = {k: v.clone() for k, v in trainer.model.trainable_state().items()}
    stats = trainer.fit(1, seed=1)
    assert stats["steps"] == expected  # 7 > 5 runs into a second epoch and stops there
    assert stats["num_examples"] == 10  # FedAvg's weight stays the site's training-set size
    after = trainer.model.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_local_steps_win_over_the_epochs_asked_for(tiny_sam, tmp_path):
    trainer = _trainer(tiny_sam, tmp_path, 2)
    assert trainer.fit(3, seed=1)["steps"] == 2  # a server's local-epochs override does not apply


def test_local_steps_are_refused_with_privacy_and_checked(tmp_path):
    with pytest.raises(ValueError, match="local_steps"):
        SiteConfig(site_id="a", data=DataRef(dataset="x"), local_steps=5, privacy=PrivacyConfig(noise_multiplier=1.0))
    y = tmp_path / "site.yaml"
    y.write_text("site_id: a\ndata: {dataset: x}\nlocal_steps: 0\n")
    with pytest.raises(ConfigError, match="local_steps"):
        load_yaml_config(y, SiteConfig)


def test_max_steps_at_an_epoch_end_keeps_that_epochs_loss(tiny_sam, tmp_path):
    from autosam_core.data.torch_dataset import make_loader
    from autosam_core.training import train_epochs

    trainer = _trainer(tiny_sam, tmp_path, None)  # 5 batches per epoch
    trainer.ensure_embeddings()
    loader = make_loader(trainer.dataset, 2, shuffle=True, seed=0)
    opt = torch.optim.Adam(trainer.model.prompt_generator.parameters(), lr=1e-3)
    stats = train_epochs(trainer.model, loader, 3, opt, progress=False, max_steps=5)
    assert stats["steps"] == 5
    assert stats["num_examples"] == 10 and stats["loss"] > 0  # not an empty third epoch's zeros

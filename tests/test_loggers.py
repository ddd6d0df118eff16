"""Optional loggers: W&B in offline mode (skipped when the `wandb` extra is not installed)."""
import pytest

from rlhf.training.pipeline import train


def test_wandb_logger_offline(tmp_path, monkeypatch, compose_cfg):
    pytest.importorskip("wandb", reason="pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(tmp_path, "debug=fast", "logger=wandb", "stage=sft")
    train(cfg)
    runs = list((tmp_path / "sft" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    # TensorBoard stays on beside it.
    assert any((tmp_path / "sft" / "tb").glob("events.out.tfevents.*"))

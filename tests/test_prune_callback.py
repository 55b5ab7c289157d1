"""PruningCallback under a real (tiny, CPU) Lightning Trainer: masks hold through optimizer steps and
fake quantization, and survive a checkpoint and resume."""
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from qat.lightning.callbacks import PruningCallback
from qat.prune import PruneSpec, check_nm
from qat.quant import QuantConfig, WeightSpec, prepare


class TinyLM(L.LightningModule):
    """Just enough LightningModule around a causal LM; AdamW with decay so that, unmasked, pruned
    weights would leave zero after the first step."""

    def __init__(self, model):
        super().__init__()
        self.model = model.train()

    def training_step(self, batch, batch_idx):
        ids = batch[0]  # (B, T)
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def loader(n=8, t=16):
    ids = torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=2)


def fit(module, callback, max_steps, tmp_path, ckpt_path=None):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def test_gradual_pruning_keeps_masked_weights_zero_through_adamw_and_fake_quant(tiny_llama,
                                                                                tmp_path):
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64, symmetric=False)))
    before = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules()
              if n.endswith("up_proj")}
    spec = PruneSpec(method="magnitude", sparsity=0.5, schedule="gradual", start_step=0,
                     end_step=2, every_n_steps=1)
    callback = PruningCallback(spec)
    trainer = fit(TinyLM(tiny_llama), callback, 3, tmp_path)
    assert trainer.global_step == 3 and callback.updates == [0, 1, 2]
    assert callback.sparsity == 0.5
    assert trainer.callback_metrics["prune/sparsity"] == 0.5
    modules = dict(tiny_llama.named_modules())
    for name, keep in callback.masks.items():
        layer = modules[name]
        assert int((~keep).sum()) == keep.numel() // 2  # exact, per layer
        assert (layer.weight[~keep] == 0).all()
        assert (layer.weight_fake_quant.dequantized(layer.weight)[~keep] == 0).all()
    for name, w in before.items():  # training really moved the kept weights
        keep = callback.masks[name]
        assert not torch.equal(modules[name].weight[keep], w[keep])


def test_nm_callback_leaves_a_2_4_model(tiny_llama, tmp_path):
    callback = PruningCallback(PruneSpec(method="magnitude", pattern="2:4", start_step=1))
    fit(TinyLM(tiny_llama), callback, 3, tmp_path)
    assert callback.updates == [1]
    for name, module in tiny_llama.named_modules():
        if name in callback.masks:
            assert check_nm(module.weight, 2, 4)
    assert not check_nm(tiny_llama.lm_head.weight, 2, 4)


def test_state_dict_round_trip_restores_masks_norms_and_position(tiny_llama, tmp_path):
    spec = PruneSpec(method="wanda", sparsity=0.7, schedule="gradual", start_step=2, end_step=6,
                     every_n_steps=2, calibration_samples=2)
    calibration = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(5))
    callback = PruningCallback(spec, calibration=calibration)
    assert not callback.update(tiny_llama, 1)  # before t0
    assert callback.update(tiny_llama, 3) and callback.last_update == 2
    assert not callback.update(tiny_llama, 3)  # already done for this step
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    restored = PruningCallback(spec, input_norms={})  # norms come from the state
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.last_update == 2 and restored.sparsity == callback.sparsity
    assert restored.masks.keys() == callback.masks.keys()
    assert all(torch.equal(restored.masks[n], callback.masks[n]) for n in callback.masks)
    assert all(torch.equal(restored.input_norms[n], callback.input_norms[n].cpu())
               for n in callback.input_norms)
    assert not restored.update(tiny_llama, 3)  # position restored: no repeat
    assert restored.update(tiny_llama, 4) and restored.sparsity > callback.sparsity
    assert all((~callback.masks[n] <= ~restored.masks[n]).all() for n in callback.masks)  # nested


def test_trainer_resume_keeps_masks_without_recomputing(tiny_llama, tmp_path):
    spec = PruneSpec(method="magnitude", sparsity=0.4, start_step=1)
    first = PruningCallback(spec)
    module = TinyLM(tiny_llama)
    trainer = fit(module, first, 2, tmp_path)
    assert first.updates == [1]
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with torch.no_grad():  # perturb: only the checkpoint can bring the zeros back
        for p in tiny_llama.parameters():
            p.add_(1.0)
    second = PruningCallback(spec)
    fit(module, second, 4, tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert second.updates == [] and second.last_update == 1  # restored, not recomputed at step 2
    assert all(torch.equal(second.masks[n].cpu(), first.masks[n].cpu()) for n in first.masks)
    modules = dict(tiny_llama.named_modules())
    assert all((modules[n].weight[~k] == 0).all() for n, k in second.masks.items())

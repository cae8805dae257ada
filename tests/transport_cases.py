"""RL sync into a separate engine process: the trainer ranks (a ``verify.pool.Pool``) and the
engine (a spawned process holding a transformers model) of tests/test_sync_transport.py."""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback

import torch

LORA = dict(r=4, alpha=8.0)


def _file_backed_channel():
    from mcore_bridge.sync_transport.ipc import IpcChannel

    class FileBackedChannel(IpcChannel):
        """The colocated channel with its CUDA memory swapped for files both processes map
        (``torch.from_file(shared=True)``): everything else -- slots, releases, handles in the
        messages, store keys -- is the library's protocol, run across real processes."""

        def __init__(self, directory: str, *args, **kwargs):
            self.directory = directory
            super().__init__(*args, **kwargs)

        @staticmethod
        def _check_device(device):
            return torch.device("cpu")

        def _allocate(self, nbytes, slot):
            path = os.path.join(self.directory, f"slot{slot}-{nbytes}")
            return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8), {"path": path, "numel": nbytes}

        def _open(self, handle):
            return torch.from_file(handle["path"], shared=True, size=handle["numel"], dtype=torch.uint8)

        def _sync(self):
            pass
    return FileBackedChannel


def _channel(init_method: str, rank: int, world: int, shm_dir: str | None):
    from mcore_bridge.sync_transport import connect

    if shm_dir is None:
        return connect(init_method, rank, world)
    return _file_backed_channel()(shm_dir, init_method, rank, world, "cpu")


def trainer(source: str, layout: dict, init_method: str, engines: int, plan: list[str], shm_dir: str | None = None,
            bucket_bytes: int | None = None) -> dict:
    """Runs ``plan`` on every trainer rank; global rank 0 sends. Returns the megatron logits
    after a LoRA step (first TP rank of the last stage)."""
    from mcore_bridge.lora import LoraSpec
    from mcore_bridge.runtime import dist as rt
    from mcore_bridge.sync import Bucket
    from mcore_bridge.sync_transport import Sender, push
    from tests.cases import _loaded
    from tests.lora_cases import _logits

    bridge, models = _loaded(source, layout)
    sender = Sender(_channel(init_method, 0, 1 + engines, shm_dir)) if rt.rank() == 0 else None
    out = {"rank": rt.rank(), "stats": []}
    for step in plan:
        if step in ("weights", "fp8", "fp8_keep"):
            out["stats"].append(push(bridge, models, sender, dtype="fp8" if step.startswith("fp8") else None,
                                     bucket_bytes=bucket_bytes))
        elif step == "lora":
            bridge.apply_lora(models, LoraSpec(**LORA), random_b=True)
            out["stats"].append(push(bridge, models, sender, lora=True, bucket_bytes=1 << 16))
            out["logits"] = _logits(bridge, models)
        elif step == "abort":  # the export fails on the sending rank after one bucket
            stream = bridge.export_buckets(models, receivers=0, bucket_bytes=1 << 16)
            if sender is not None:
                def failing(stream=stream):
                    for i, b in enumerate(stream):
                        if i == 1:
                            raise RuntimeError("export failed (test)")
                        yield b
                try:
                    sender.send(failing())
                except RuntimeError as e:
                    out["abort"] = str(e)
            for _ in stream:  # the other ranks' collectives of this export
                pass
        elif step in ("drop", "rename", "twice"):  # negative controls: a bucket lost / sent twice, a wrong name
            stream = bridge.export_buckets(models, receivers=0, bucket_bytes=1 << 16)
            if sender is None:
                for _ in stream:
                    pass
                continue

            def tampered(stream=stream, step=step):
                for i, b in enumerate(stream):
                    if step == "drop" and i == 1:
                        continue
                    if step == "twice" and i == 1:
                        yield b
                    if step == "rename" and i == 1:
                        names = list(b.meta.names)
                        names[0] = names[0].replace("layers.", "layerz.")
                        b = Bucket(b.buffer, dataclasses.replace(b.meta, names=tuple(names)))
                    yield b
            sender.send(tampered())
        else:
            raise ValueError(step)
    out["world"] = torch.distributed.get_world_size()  # the host's group, as before connect
    if sender is not None and shm_dir is not None:  # the colocated channel's store keys left behind
        ch = sender.group
        out["keys"] = [k for i in range(ch.seq) for k in (f"msg/{i}", f"done/{i}/1") if ch.store.check([k])]
    return out


def _logits_of(model, vocab: int):
    from tests.lora_cases import input_ids

    with torch.no_grad():
        return model(input_ids=input_ids(vocab)).logits


def engine(init_method: str, rank: int, world: int, source: str, plan: list[str], result: str,
           shm_dir: str | None = None) -> None:
    """The engine stand-in: a randomly initialised transformers model, filled by the sync. Its
    findings (or its traceback) are saved to ``result``."""
    try:
        out = ("ok", _engine(init_method, rank, world, source, plan, shm_dir))
    except BaseException:  # noqa: BLE001 -- reported to the test
        out = ("error", traceback.format_exc())
    torch.save(out, result + ".tmp")
    os.replace(result + ".tmp", result)


def _engine(init_method, rank, world, source, plan, shm_dir) -> dict:
    import transformers

    from mcore_bridge.sync_transport import ModelTargets, Receiver, SyncError

    config = transformers.AutoConfig.from_pretrained(source)
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    vocab = config.vocab_size
    group = _channel(init_method, rank, world, shm_dir)
    out = {"before": _logits_of(model, vocab)}
    for step in plan:
        if step in ("weights", "fp8"):
            out[step + "_stats"] = Receiver(group, model).receive()
            out[step] = _logits_of(model, vocab)
            out[step + "_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        elif step == "fp8_keep":
            kept = {}
            expected = ModelTargets(model).expected()
            Receiver(group, load=lambda named: kept.update({n: t.clone() for n, t in named}), expected=expected,
                     fp8="keep").receive()
            out[step] = kept
        elif step == "lora":
            import peft

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                               target_modules=targets)).eval()
            out["lora_stats"] = Receiver(group, model, lora=True).receive()
            out["lora"] = _logits_of(model, vocab)
        elif step in ("drop", "rename", "twice", "abort"):
            receiver = Receiver(group, model)
            try:
                receiver.receive()
                out[step] = None
            except SyncError as e:
                out[step] = str(e)
                out[step + "_complete"] = receiver.complete
        else:
            raise ValueError(step)
    group.close()
    out["megatron_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "megatron")[:3]
    return out

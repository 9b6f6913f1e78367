"""Captions: BLIP-2 on the clip's middle frame (as HD-VG-130M did), BLIP selectable,
multi-frame selectable; batched generation, bf16 on GPU.

Throughput: in a Ray run the CPU frame pool ahead of the model actors decodes each clip's
frames (`hdvg.frames`, shared with the other stages) and runs the image processor's resize
(`prepare`), so the GPU actor's process only stacks ready uint8 tensors, normalises them on
the device and generates, as a direct loop over ready tensors would. Without the pool
(serial runs, `frame_pool: off`) CPU threads decode and process the next batches while the
accelerator generates one.

The processor is split where its torchvision backend allows it (transformers' fast image
processors: resize, crop, then one fused `rescale_and_normalize`): the pool carries the
resized uint8 image (4x smaller than float32 pixels) and the actor runs the same
`rescale_and_normalize` on the device. The split is checked against the whole processor
on the first image (bit for bit) and dropped, for float32 pixels, if it differs.

Multi-frame (`frames: multi`): each of `n_frames` frames is captioned and the caption
agreeing most with the others (mean word overlap) is kept: a consensus, not a summary.
`caption_model` records `name@revision` with every caption.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...frames import get_frames, memo
from ...models import WeightRef, device_for, resolve_hf
from ...records import Clip
from ..base import Stage, StageContext
from .base import ModelMixin

BACKENDS = {  # backend -> (default model, transformers class)
    "blip2": ("Salesforce/blip2-opt-2.7b", "Blip2ForConditionalGeneration"),
    "blip": ("Salesforce/blip-image-captioning-large", "BlipForConditionalGeneration"),
}


@dataclass
class CaptionConfig:
    backend: str = "blip2"  # blip2 | blip
    model: str | None = None  # HF name; default per backend
    revision: str | None = None
    path: str | None = None  # a save_pretrained folder instead of the HF cache
    frames: str = "middle"  # middle | multi
    n_frames: int = 3  # multi: frames captioned per clip
    batch_size: int = 32  # images per generate() call
    max_new_tokens: int = 30
    min_new_tokens: int = 0  # benchmarks fix the length: min = max
    num_beams: int = 1
    prompt: str | None = None  # BLIP-2: e.g. "a video of"; None: unconditional
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    prefetch: int = 2  # batches prepared ahead on a CPU thread
    decode_threads: int = 4  # clips decoded in parallel ahead of generation (PyAV frees the GIL)
    # dynamic | static: a preallocated KV cache; on CUDA transformers then compiles the decode
    # step into CUDA graphs (one launch per token instead of thousands), so `generate` no
    # longer waits on a CPU shared with the frame pool. One compile: short batches are
    # padded to batch_size (`_pad_rows`).
    cache: str = "dynamic"
    # what compiles the decode step under the static cache on CUDA. cudagraphs: dynamo traces
    # it and CUDA graphs replay its eager kernels (no kernel generation: seconds to build);
    # inductor: transformers' own default ("reduce-overhead": generated kernels inside the
    # graphs), which compiles for minutes at the OPT-2.7B shape
    static_compile: str = "cudagraphs"

    def validate(self) -> None:
        from ...config import ConfigError

        if self.backend not in BACKENDS:
            raise ConfigError(f"caption.backend must be one of {', '.join(BACKENDS)}")
        if self.frames not in ("middle", "multi"):
            raise ConfigError("caption.frames must be 'middle' or 'multi'")
        if self.cache not in ("dynamic", "static"):
            raise ConfigError("caption.cache must be 'dynamic' or 'static'")
        if self.static_compile not in ("cudagraphs", "inductor"):
            raise ConfigError("caption.static_compile must be 'cudagraphs' or 'inductor'")


def consensus(captions: list[str]) -> str:
    """The caption sharing the most words with the others (first on ties)."""
    if len(captions) <= 2:
        return captions[len(captions) // 2] if len(captions) == 2 else captions[0]
    sets = [set(c.lower().split()) for c in captions]

    def agree(i: int) -> float:
        return sum(
            len(sets[i] & s) / max(1, len(sets[i] | s)) for j, s in enumerate(sets) if j != i
        )

    return captions[max(range(len(captions)), key=agree)]


class CaptionStage(ModelMixin, Stage):
    name = "caption"
    Config = CaptionConfig
    needs = "clip"
    uses_model = True

    @property
    def model_name(self) -> str:
        if self.cfg.model:
            return self.cfg.model
        if self.cfg.path:  # a local folder is named by itself, not by the default model
            return self.cfg.path.rstrip("/").rsplit("/", 1)[-1]
        return BACKENDS[self.cfg.backend][0]

    @property
    def frame_use(self) -> str:
        return "middle" if self.cfg.frames == "middle" else "spread"

    def weights(self) -> list[WeightRef]:
        c = self.cfg
        return [resolve_hf(self.name, self.model_name, c.revision, c.path, self.models)]

    def _source(self):
        (ref,) = self.resolved()
        kw: dict[str, Any] = {"local_files_only": not self.models.allow_download}
        if not ref.resolved:
            kw.update(revision=self.cfg.revision, cache_dir=ref.where.split(" ")[0])
        return ref, ref.resolved or self.model_name, kw

    def setup(self) -> None:
        import torch
        import transformers

        ref, src, kw = self._source()
        device = device_for(self.models)
        dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[self.cfg.dtype]  # fmt: skip
        cls = getattr(transformers, BACKENDS[self.cfg.backend][1])
        processor = transformers.AutoProcessor.from_pretrained(src, **kw)
        model = cls.from_pretrained(src, dtype=dtype, **kw).to(device).eval()
        self.attach(model, processor, ref.label)

    def attach(self, model, processor, label: str) -> None:
        """Use an already-built model (the benchmark builds an 8 GB random one in place)."""
        self.model, self.processor, self.label = model, processor, label
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # --- CPU side, in the frame pool ------------------------------------------------------

    def prepare(self, clips: list[Clip]) -> None:
        """Pixel tensors of each clip's caption frames, computed where its frames were
        decoded (the CPU frame pool) and carried with them, so the actor's process does no
        image work: uint8 resized images when the processor splits (see the module doc),
        else float32 pixels as the processor makes them. The same captions either way."""
        if getattr(self, "processor", None) is None:  # the pool loads the processor only
            import transformers

            _, src, kw = self._source()
            self.processor = transformers.AutoProcessor.from_pretrained(src, **kw)
        for c in clips:
            memo(c, "caption_pixels", lambda _, c=c: self._pixels(self._images(c)),
                 self.frame_spec)  # fmt: skip

    pool_ready = True  # `process_batch` reads only the memo `prepare` left

    def _pixels(self, images: list[np.ndarray]) -> np.ndarray:
        ip = self.processor.image_processor
        if self._splits():
            return ip(images, do_rescale=False, do_normalize=False,
                      return_tensors="pt")["pixel_values"].numpy()  # fmt: skip
        return ip(images, return_tensors="np")["pixel_values"]

    def _splits(self) -> bool:
        """Whether the processor's last step is a separate `rescale_and_normalize` giving
        exactly the processor's own output (checked once, on a fixed image)."""
        ok = getattr(self, "_split_ok", None)
        if ok is None:
            ok = False
            ip = self.processor.image_processor
            if getattr(ip, "backend", None) == "torchvision" or type(ip).__name__.endswith("Fast"):
                import torch

                img = np.random.default_rng(0).integers(0, 256, (90, 160, 3), np.uint8)
                try:
                    full = ip([img], return_tensors="pt")["pixel_values"]
                    u8 = ip([img], do_rescale=False, do_normalize=False,
                            return_tensors="pt")["pixel_values"]  # fmt: skip
                    ok = u8.dtype == torch.uint8 and torch.equal(self._normalize(u8), full)
                except (TypeError, ValueError, AttributeError):
                    ok = False
            self._split_ok = ok
        return ok

    def _normalize(self, u8):
        """The processor's own last step, on whatever device `u8` is on."""
        ip = self.processor.image_processor
        mean, std = (tuple(v) if isinstance(v, list) else v for v in (ip.image_mean, ip.image_std))
        return ip.rescale_and_normalize(u8, ip.do_rescale, ip.rescale_factor, ip.do_normalize,
                                        mean, std)  # fmt: skip

    # --- per batch ----------------------------------------------------------------------

    def _images(self, clip: Clip) -> list[np.ndarray]:
        fr = get_frames(clip, self.frame_spec)
        if self.cfg.frames == "middle":
            return [fr.images[fr.middle]]
        k = min(self.cfg.n_frames, len(fr.images))
        return [fr.images[int(i)] for i in np.linspace(0, len(fr.images) - 1, k)]

    def _prepare(self, clips: list[Clip], decoded: dict[int, Any]):
        """CPU side of one batch: wait for its clips' frames; their pixel tensors as the
        frame pool prepared them, or the image processor's now."""
        import torch

        owners, pixels, failed = [], [], []
        for c in clips:
            try:
                fr = decoded[id(c)].result()
                pix = fr.memo.get("caption_pixels")
                if pix is None:
                    pix = self._pixels(self._images(c))
            except Exception as e:  # noqa: BLE001 - this clip's failure, not the batch's
                failed.append((c, str(e)))
                continue
            owners += [c] * len(pix)
            pixels.append(pix)
        if not pixels:
            return owners, None, failed
        inputs = {"pixel_values": torch.from_numpy(np.concatenate(pixels))}
        if self.cfg.prompt:
            inputs.update(self._prompt_ids(len(owners)))
        if self.device.type == "cuda":
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        return owners, inputs, failed

    def _prompt_ids(self, n: int) -> dict[str, Any]:
        """The prompt's token ids, as the processor lays them out beside an image (BLIP-2
        puts its query-token placeholders first), repeated for `n` images."""
        if not hasattr(self, "_prompt_enc"):
            size = self.processor.image_processor.size
            h, w = size.get("height", 224), size.get("width", 224)
            enc = self.processor(images=[np.zeros((h, w, 3), np.uint8)],
                                 text=[self.cfg.prompt], return_tensors="pt")  # fmt: skip
            self._prompt_enc = {k: v for k, v in enc.items() if k != "pixel_values"}
        return {k: v.expand(n, -1).contiguous() for k, v in self._prompt_enc.items()}

    def _generate(self, inputs) -> list[str]:
        import torch

        t1 = time.perf_counter()
        n = len(inputs["pixel_values"])
        if self.cfg.cache == "static":
            clips, per_clip = self._batch_shape()
            inputs = _pad_rows(inputs, clips * per_clip)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        pix = inputs["pixel_values"]
        if pix.dtype == torch.uint8:  # resized by the pool; normalised here
            pix = self._normalize(pix)
        inputs["pixel_values"] = pix.to(self.dtype)
        t2 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs())
        t3 = time.perf_counter()
        if self.cfg.prompt and out.shape[1] > inputs.get("input_ids", out).shape[1] and (
            self.cfg.backend == "blip"):  # fmt: skip
            out = out[:, inputs["input_ids"].shape[1] :]
        out = out[:n]  # the rows `_pad_rows` added
        texts = [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        self.timings.update(to_device_s=t2 - t1, generate_s=t3 - t2,
                            decode_text_s=time.perf_counter() - t3, batches=1,
                            images=len(texts))  # fmt: skip
        return texts

    def _batch_shape(self) -> tuple[int, int]:
        """(clips, images per clip) of one `generate` call."""
        per_clip = 1 if self.cfg.frames == "middle" else self.cfg.n_frames
        return max(1, self.cfg.batch_size // per_clip), per_clip

    def generate_kwargs(self) -> dict:
        """`generate` settings from the config (also what the benchmark's direct loop uses)."""
        kw = {"max_new_tokens": self.cfg.max_new_tokens, "min_new_tokens": self.cfg.min_new_tokens,
              "num_beams": self.cfg.num_beams, "do_sample": False}  # fmt: skip
        if self.cfg.cache == "static":
            kw["cache_implementation"] = "static"
            kw["compile_config"] = self.compile_config()
        return kw

    def compile_config(self):
        """How ``generate`` compiles its decode step under the static cache (on CUDA only;
        transformers runs it eagerly elsewhere): ``caption.static_compile``. Equal configs on
        every call, so the step compiles once."""
        from transformers import CompileConfig

        if self.cfg.static_compile == "inductor":
            return CompileConfig()  # transformers' default: inductor, reduce-overhead
        return CompileConfig(backend="cudagraphs", mode=None)

    @property
    def timings(self) -> Counter:
        """Seconds spent per step of `_generate`, summed over calls (the benchmark's
        breakdown of the actor: generation against everything else)."""
        if "_timings" not in self.__dict__:
            self._timings = Counter()
        return self._timings

    def process_batch(self, clips: list[Clip], ctx: list[StageContext]) -> None:
        step, _ = self._batch_shape()
        chunks = [clips[i : i + step] for i in range(0, len(clips), step)]
        texts: dict[int, list[str]] = {}
        with (ThreadPoolExecutor(self.cfg.decode_threads, "caption-decode") as dec,
              ThreadPoolExecutor(1, thread_name_prefix="caption-prep") as pool):  # fmt: skip
            decoded = {
                id(c): dec.submit(get_frames, c, self.frame_spec) for c in clips
            }  # in order, ahead
            futures = [
                pool.submit(self._prepare, ch, decoded) for ch in chunks[: self.cfg.prefetch]
            ]
            for i in range(len(chunks)):
                owners, inputs, failed = futures[i].result()
                if i + self.cfg.prefetch < len(chunks):  # keep the CPU batches ahead
                    nxt = chunks[i + self.cfg.prefetch]
                    futures.append(pool.submit(self._prepare, nxt, decoded))
                for c, err in failed:
                    c.fail("decode_error", f"frames: {err}")
                if inputs is None:
                    continue
                for c, t in zip(owners, self._generate(inputs), strict=True):
                    texts.setdefault(id(c), []).append(t)
        for c in clips:
            if id(c) in texts:
                c.caption = consensus(texts[id(c)])
                c.caption_model = self.label


def _pad_rows(inputs: dict[str, Any], rows: int) -> dict[str, Any]:
    """A short batch (the last of a run, or of an actor's block) padded to `rows` with copies
    of its last row. Under a static KV cache each new batch shape costs a fresh compile of
    the decode step (CUDA graphs, seconds); one shape compiles once. Greedy decoding treats
    rows independently and every row has the same prompt, so the real rows' captions are
    unchanged; the caller drops the copies' outputs."""
    import torch

    n = len(inputs["pixel_values"])
    if n >= rows:
        return inputs
    return {k: torch.cat([v, v[-1:].expand(rows - n, *v.shape[1:])]) for k, v in inputs.items()}

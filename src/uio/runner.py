"""The public API: :class:`ModelRunner`, compatible with the original ``uio.runner.ModelRunner``.

>>> from uio import runner
>>> model = runner.ModelRunner("small", "small.bin")
>>> model.vqa(image, "What color is the sofa?")["text"]
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import accel, checks, generate, processing
from .checkpoint import CheckpointError, load_checkpoint_file, load_into
from .config import CONFIGS, VAE_CONFIG, load_config  # noqa: F401  (re-exported like the original)
from .accel import cpu_kernels
from .accel.hardware import computes_natively
from .model.transformer import UnifiedIO
from .tasks import (  # noqa: F401  (the original exposes its prompts and colors from this module)
    CAPTIONING_PROMPT, DEPTH_PROMPT, GEN_SEGMENTATION_COLOR_NAMES, GEN_SEGMENTATION_COLORS, IMAGE_GENERATION,
    IMAGE_INPAINTING, IMAGE_TAGGING, OBJECT_SEGMENTATION, POSE_ESTIMATION, REFEXP_PROMPT, REGION_CAPTION,
    REGION_CLASSIFICATION, SEGMENTATION_BASED_GENERATION, SURFACE_NORMAL_PROMPT, TASKS, Task, build_prompt,
    model_call, postprocess, region_text, segmentation_input, task_result)
from .tokenizer import T5Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

MAX_OUTPUT_TEXT_LEN = 128
IMAGE_OUTPUT_LENGTH = 256
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"`` (or a floating-point torch dtype; None means fp32) -> torch dtype."""
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] -> float32 images in [0, 1] (clipped)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def default_device() -> str:
    """CUDA when available, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``... (None: :func:`default_device`) -> torch device, or a
    ValueError saying why this machine cannot use it."""
    try:
        resolved = torch.device(device or default_device())
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} needs CUDA, which is not available here (torch {torch.__version__})")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def build_model(size: str | os.PathLike, param_file: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, prepack: bool | None = None, compiled: bool = False) -> UnifiedIO:
    """Build the network for ``size`` (a size name or config JSON) and load ``param_file`` into it.

    The VQGAN runs in bf16 when ``dtype`` is bf16 (its decoded images stay within ~58 dB PSNR of
    fp32, measured by ``benchmarks/bench_vqgan.py``), except on a CPU without bf16 kernels (see
    :func:`~uio.accel.hardware.computes_natively`), and in fp32 otherwise. Unless ``UIO_ACCEL=0``
    (or :func:`uio.accel.disable`), the acceleration layer lays the weights out and decides how
    the model runs (:func:`uio.accel.configure`: ``prepack``, traced CPU steps, CUDA graphs,
    ``compiled``); otherwise it runs on the plain torch reference path.
    """
    device = resolve_device(device)
    accelerated = accel.switched_on()
    if compiled and not accelerated:
        raise ValueError("compiled=True needs uio.accel, which UIO_ACCEL=0 or uio.accel.disable() switched off")
    config, vae_config = load_config(size)
    with torch.device("meta"):
        model = UnifiedIO(config, vae_config)
    placement = accel.prepare(model, device, dtype) if accelerated else None
    load_into(model, load_checkpoint_file(param_file), str(param_file), dtype=dtype, device=device,
              placement=placement)
    native_bf16 = computes_natively(torch.bfloat16, device)
    if dtype == torch.bfloat16 and not native_bf16:
        speed = (f"decoding steps of up to {cpu_kernels.MAX_ROWS} rows run uio's CPU kernel (half the bytes of fp32)"
                 if accelerated and cpu_kernels.in_use(dtype)
                 else "decoding one example at a time is faster than in fp32, batches slower")
        log.warning("this CPU has no bf16 kernels (AVX-512 BF16 or AMX): bf16 halves the weights' memory and %s; "
                    "the VQGAN stays in fp32", speed)
    model.discrete_vae.to(torch.bfloat16 if dtype == torch.bfloat16 and native_bf16 else torch.float32)
    model.eval().requires_grad_(False)
    if accelerated:
        accel.configure(model, prepack, compiled)
    return model


class ModelRunner:
    """High-level API: run Unified-IO on images and prompts, or on any of its tasks.

    :param size: ``small``, ``base``, ``large``, ``xl``, or the path of a config JSON
    :param param_file: the released ``.bin`` checkpoint (or a converted ``.safetensors``)
    :param pad_input_to_max: pad prompts to ``max_input_len`` (defaults to ``compiled``)
    :param max_input_len: prompts are truncated to this many tokens (64 by default, up to 256)
    :param max_options: answer options scored per forward pass
    :param compiled: use ``torch.compile`` for the decoder step
    :param log_inputs: log each prompt
    :param tokenizer: path of a ``spiece.model`` (or its folder); default: the t5-base vocabulary
    :param device: ``"cpu"``, ``"cuda"``...; default: CUDA when available
    :param dtype: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` for the transformer
    :param seed: seed of the sampler used by image tasks (sampling is deterministic per call)
    :param prepack: on the CPU, keep oneDNN-packed copies of the weights a decoding step reads
        (faster steps, for a third (small) to a half (xl) more weight memory; see :func:`build_model`).
        By default (None) only where uio's CPU kernels (:mod:`uio.accel.cpu_kernels`) are not loaded
        or do not serve the dtype: they serve steps of up to 32 rows, where they are as fast as the
        copies or faster; True keeps them anyway (steps of 33-64 rows ~10% faster)
    :param stop_at_eos: stop decoding text once every sequence has emitted EOS (text outputs
        only). The reference always decodes ``output_text_len`` steps and scores them all: the
        text is the same, but scores count only the steps run, so beams may rank differently.
        Short answers (VQA, classification, captions) then take a few steps instead of 32
    """

    def __init__(self, size: str | os.PathLike, param_file: str | os.PathLike, pad_input_to_max: bool | None = None,
                 max_input_len: int = 64, max_options: int = 800, compiled: bool = False, log_inputs: bool = True,
                 *, tokenizer: str | os.PathLike | T5Tokenizer | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, seed: int = 0, prepack: bool | None = None,
                 stop_at_eos: bool = False):
        # Before any loading: bad arguments fail at once.
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        if max_input_len < 1 or max_options < 1:
            raise ValueError(f"max_input_len and max_options must be at least 1, got {max_input_len} and {max_options}")
        self.max_input_len = max_input_len
        self.pad_to_max = compiled if pad_input_to_max is None else pad_input_to_max
        self.max_options = max_options
        self.compiled = compiled
        self.log_inputs = log_inputs
        self.seed = seed
        self.stop_at_eos = stop_at_eos
        self.tokenizer = tokenizer if isinstance(tokenizer, T5Tokenizer) else load_tokenizer(
            tokenizer, model_max_length=256)
        self.model = build_model(size, param_file, device, dtype, prepack=prepack, compiled=compiled)

    @property
    def device(self) -> torch.device:
        """Where the transformer's weights are (it follows ``self.model.to(...)``)."""
        return self.model.token_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype (it follows ``self.model.to(...)``)."""
        return self.model.token_embedder.weight.dtype

    @classmethod
    def from_pretrained(cls, size: str = "small", *, weights: str | os.PathLike | None = None,
                        download: bool = True, **kwargs: Any) -> "ModelRunner":
        """Load a released model by size, downloading its checkpoint into the cache on first use.

        A converted ``{size}.safetensors`` in the cache is preferred over the ``.bin``. ``weights``
        overrides the file; other arguments are those of :class:`ModelRunner`.
        """
        from . import hub

        if weights is not None:
            return cls(size, Path(weights), **kwargs)
        path = hub.checkpoint_path(size, download=download)
        try:
            return cls(size, path, **kwargs)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; {hub.damaged_file_advice(path)}") from err

    # ---- the low-level API -------------------------------------------------------------------

    def run(self, input_images: Sequence[np.ndarray | None], input_texts: Sequence[str], output_text_len: int = 128,
            generate_image: bool = False, beam_search: bool | None = None, num_decodes: int | None = None,
            answer_options: Sequence[str] | Sequence[np.ndarray] | None = None,
            mask_regions: Sequence[Sequence[float] | None] | None = None, average_loss: bool = False) -> dict:
        """Run the model on a batch of images (HxWx3 uint8/float arrays, or None) and prompts.

        Returns a dict with ``text_tokens``, ``text``, ``image_tokens``, ``image``, ``score`` (and
        ``all_scores`` with answer options), shaped as the original runner returns them: a
        ``num_decodes`` axis after the batch axis, dropped from ``text``/``image`` when
        ``num_decodes`` is None. ``answer_options`` restricts the output to one of the given
        strings (or images), scored by loss (lower is better).
        """
        inputs = checks.check_run_inputs(input_images, input_texts, output_text_len, generate_image, beam_search,
                                         num_decodes, answer_options, mask_regions, average_loss,
                                         max_output_text_len=MAX_OUTPUT_TEXT_LEN)
        self._warn_long_texts(inputs)
        beam_search = not inputs.generate_image if inputs.beam_search is None else inputs.beam_search
        if self.log_inputs:
            log.info("Running model text_inputs=%s", inputs.texts)
        enc = self._encode(inputs.images, inputs.texts, inputs.mask_regions)
        if inputs.answer_options:
            out = self._answer_options(enc, inputs.answer_options, inputs.average_loss)
        else:
            out = self._generate(enc, inputs.output_text_len, inputs.generate_image, beam_search,
                                 inputs.num_decodes or 1)
        return self._format(out, inputs.output_text_len, inputs.generate_image, inputs.num_decodes)

    def _warn_long_texts(self, inputs: checks.RunInputs) -> None:
        """Warn about prompts and text options that ``max_input_len`` cuts (they still run, cut)."""
        checks.warn_long_prompts(self.tokenizer, inputs.texts, self.max_input_len, "input_texts")
        if inputs.answer_options and isinstance(inputs.answer_options[0], str):
            checks.warn_long_prompts(self.tokenizer, inputs.answer_options, self.max_input_len, "answer_options")

    def _encode(self, images, texts, mask_regions) -> generate.EncoderOutput:
        tokens = self.tokenizer(list(texts), max_length=self.max_input_len, truncation=True,
                                padding="max_length" if self.pad_to_max else "longest")
        prepared = [processing.preprocess_image(image, None if mask_regions is None else mask_regions[i])
                    for i, image in enumerate(images)]
        pixels = torch.from_numpy(np.stack([p[0] for p in prepared]).astype(np.float32))
        masks = torch.from_numpy(np.stack([p[1] for p in prepared]))
        # Compiled graphs have fixed shapes: skipping padding would compile one per image aspect ratio.
        with torch.inference_mode():
            return self.model.encode(torch.from_numpy(tokens).long().to(self.device),
                                     pixels.to(self.device, self.dtype), None, masks.to(self.device),
                                     skip_padding=not self.compiled)

    def _generate(self, enc, text_length: int, generate_image: bool, beam_search: bool, num_decodes: int) -> dict:
        image_length = IMAGE_OUTPUT_LENGTH if generate_image else 1
        stop = self.stop_at_eos and not generate_image
        if beam_search:
            result = generate.beam_search(self.model, enc, text_length, image_length, num_decodes, stop_at_eos=stop)
        else:
            rng = torch.Generator(device=self.device).manual_seed(self.seed)
            result = generate.sample(self.model, enc, text_length, image_length, num_decodes, generator=rng,
                                     stop_at_eos=stop)
        out = {"text_tokens": result.tokens, "scores": result.scores}
        if generate_image:
            codes = result.tokens[..., -IMAGE_OUTPUT_LENGTH:] - self.model.cfg.vocab_size
            out["text_tokens"] = result.tokens[..., :-IMAGE_OUTPUT_LENGTH]
            out["image_tokens"] = codes
            out["image"] = self._decode_images(codes)
        return out

    def _decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """VQGAN codes (..., 256) -> images (..., 256, 256, 3) in [0, 1]."""
        with torch.inference_mode():
            images = self.model.discrete_vae.decode_codes(codes.reshape(-1, codes.shape[-1]))
        return to_unit_range(images).reshape(*codes.shape[:-1], *images.shape[1:])

    def _answer_options(self, enc, answer_options, average_loss: bool) -> dict:
        """Score every option; return the best one (lowest loss) per example, as the original does."""
        if isinstance(answer_options[0], str):
            options = self.tokenizer(list(answer_options), max_length=self.max_input_len, truncation=True,
                                     padding="longest")
            options = torch.from_numpy(options).long().to(self.device)
            losses = generate.score_text_options(self.model, enc, options, self.max_options, average_loss)
            key = "text_tokens"
        else:  # images (checks.check_answer_options allows no third kind)
            prepared = [processing.preprocess_target_image(option) for option in answer_options]
            images = torch.from_numpy(np.stack([p[0] for p in prepared]).astype(np.float32)).to(self.device)
            masks = torch.from_numpy(np.stack([p[1] for p in prepared])).long().to(self.device)
            with torch.inference_mode():
                codes = self.model.discrete_vae.encode_to_codes(images)
            losses = generate.score_image_options(self.model, enc, codes, masks, self.max_options, average_loss)
            key, options = "image", to_unit_range(images)
        best = losses.argmin(dim=1)
        return {key: options[best][:, None], "scores": losses.gather(1, best[:, None]), "all_scores": losses[:, None]}

    def _format(self, out: dict, output_text_len: int, generate_image: bool, num_decodes: int | None) -> dict:
        """Shape the outputs as the original runner does (numpy arrays, text cut at the first EOS)."""
        as_numpy = {k: v.cpu().numpy() for k, v in out.items()}
        text_tokens = as_numpy.get("text_tokens")
        text = None
        if output_text_len > 1 and text_tokens is not None:
            text = [[self._decode_text(row) for row in example] for example in text_tokens]
        image = as_numpy.get("image") if generate_image else None
        if num_decodes is None:
            text = None if text is None else [beams[0] for beams in text]
            image = None if image is None else image[:, 0]
        result = {"text_tokens": None if text_tokens is None else text_tokens.astype(np.int32), "text": text,
                  "image_tokens": as_numpy["image_tokens"].astype(np.int32) if "image_tokens" in as_numpy else None,
                  "image": image, "score": as_numpy["scores"]}
        if "all_scores" in as_numpy:
            result["all_scores"] = as_numpy["all_scores"]
        return result

    def _decode_text(self, row: np.ndarray) -> str:
        eos = np.flatnonzero(row == generate.EOS)
        return self.tokenizer.decode(row[:eos[0]] if len(eos) else row, skip_special_tokens=False)

    # ---- tasks ---------------------------------------------------------------------------------

    def _task(self, name: str, inputs: dict, num_decodes: int | None, beam_search: bool | None) -> dict:
        """Run task ``name`` on ``inputs`` (its method's arguments): prepare, run, post-process."""
        call = model_call(name, inputs, num_decodes, beam_search)
        return task_result(name, call, self.run(**call.run_arguments()), self.tokenizer)

    def caption(self, image: np.ndarray, num_decodes: int | None = None, beam_search: bool | None = None) -> dict:
        """Caption ``image``: ``{"text", "score"}``."""
        return self._task("caption", {"image": image}, num_decodes, beam_search)

    def vqa(self, image: np.ndarray, question: str, num_decodes: int | None = None,
            beam_search: bool | None = None) -> dict:
        """Answer ``question`` about ``image`` (lowercased, as trained): ``{"text", "score"}``."""
        return self._task("vqa", {"image": image, "question": question}, num_decodes, beam_search)

    def depth(self, image: np.ndarray, num_decodes: int | None = None, beam_search: bool | None = None) -> dict:
        """Depth map of ``image``: ``{"image" (256x256x3), "rescaled_image" (image's size), "score"}``."""
        return self._task("depth", {"image": image}, num_decodes, beam_search)

    def surface_normal(self, image: np.ndarray, num_decodes: int | None = None,
                       beam_search: bool | None = None) -> dict:
        """RGB surface normals of ``image``: ``{"image", "rescaled_image", "score"}``."""
        return self._task("surface_normal", {"image": image}, num_decodes, beam_search)

    def image_generation(self, description: str, num_decodes: int | None = None,
                         beam_search: bool | None = None) -> dict:
        """Generate a 256x256 image of ``description``: ``{"image", "score"}``."""
        return self._task("image_generation", {"description": description}, num_decodes, beam_search)

    def image_inpainting(self, image: np.ndarray, location: Sequence[float], replace_with: str,
                         num_decodes: int | None = None, beam_search: bool | None = None) -> dict:
        """Repaint box ``location`` ([x1, y1, x2, y2] pixels) of ``image`` with ``replace_with``."""
        return self._task("image_inpainting", {"image": image, "location": location, "replace_with": replace_with},
                          num_decodes, beam_search)

    def object_segmentation(self, image: np.ndarray, object_name: str, num_decodes: int | None = None,
                            beam_search: bool | None = None) -> dict:
        """Instance masks of ``object_name``: ``{"mask" (list of 256x256 bool), "image", "score"}``."""
        return self._task("object_segmentation", {"image": image, "object_name": object_name},
                          num_decodes, beam_search)

    def refexp(self, image: np.ndarray, expression: str, num_decodes: int | None = None,
               beam_search: bool | None = None) -> dict:
        """Boxes for the referring ``expression``: ``{"boxes", "labels", "text", "score", "text_tokens"}``."""
        return self._task("refexp", {"image": image, "expression": expression}, num_decodes, beam_search)

    def object_localization(self, image: np.ndarray, object_name: str, num_decodes: int | None = None,
                            beam_search: bool | None = None) -> dict:
        """Boxes of every ``object_name`` (same prompt as :meth:`refexp`)."""
        return self._task("object_localization", {"image": image, "object_name": object_name},
                          num_decodes, beam_search)

    def region_caption(self, image: np.ndarray, location: Sequence[float], num_decodes: int | None = None,
                       beam_search: bool | None = None) -> dict:
        """Caption the box ``location``: ``{"text", "score"}``."""
        return self._task("region_caption", {"image": image, "location": location}, num_decodes, beam_search)

    def region_classification(self, image: np.ndarray, location: Sequence[float], num_decodes: int | None = None,
                              answer_options: Sequence[str] | None = None, beam_search: bool | None = None) -> dict:
        """Class of the object in box ``location``, one of ``answer_options`` if given."""
        return self._task("region_classification",
                          {"image": image, "location": location, "answer_options": answer_options},
                          num_decodes, beam_search)

    def image_classification(self, image: np.ndarray, num_decodes: int | None = None,
                             answer_options: Sequence[str] | None = None, beam_search: bool | None = None) -> dict:
        """Class of ``image``, one of ``answer_options`` if given: ``{"text", "score"}``."""
        return self._task("image_classification", {"image": image, "answer_options": answer_options},
                          num_decodes, beam_search)

    def pose(self, image: np.ndarray, location: Sequence[float], num_decodes: int | None = None,
             beam_search: bool | None = None) -> dict:
        """Human joints in box ``location``: ``{"points", "labels", "invalid", "score", "text_tokens"}``.

        Samples by default, as the original does; ``beam_search=True`` makes it deterministic.
        """
        return self._task("pose", {"image": image, "location": location}, num_decodes, beam_search)

    def segmentation_based_generation(self, binary_masks: Sequence[np.ndarray], labels: Sequence[str],
                                      num_decodes: int | None = None, beam_search: bool | None = None) -> dict:
        """Generate an image whose pixels in ``binary_masks[i]`` show ``labels[i]``: ``{"image", "score"}``."""
        return self._task("segmentation_based_generation", {"binary_masks": binary_masks, "labels": labels},
                          num_decodes, beam_search)

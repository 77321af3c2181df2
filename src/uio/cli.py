"""The ``uio`` command line: every task, arbitrary prompts, checkpoint conversion, the demo.

One sub-command per task (``uio caption IMAGE``, ``uio vqa IMAGE "question"``, ...) is generated
from the task table :data:`uio.tasks.TASKS`: its name, arguments, :class:`~uio.runner.ModelRunner`
method and how its output is shown (by :mod:`uio.results`). Text results are printed; spatial
results are saved as PNG (boxes, keypoints and masks drawn onto the input image, depth as
grayscale at the input's size, generated images at 256x256). ``--json`` prints one JSON object instead.

Exit status: 0 on success, 2 for a bad command line or unusable input (missing or unreadable
file, malformed box...), 1 when the work itself fails (checkpoint, download, model errors).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from . import checks, images
from .results import SPATIAL_OUTPUTS, Context, describe, numbered
from .tasks import OPTIONS, TASKS, Arg

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEMO_QUESTION = "What color is the sofa?"
MODEL_SIZES = ("small", "base", "large", "xl")
DTYPE_NAMES = ("fp32", "bf16", "fp16")
MAX_TEXT_LEN = 128  # ModelRunner's MAX_OUTPUT_TEXT_LEN, kept here so --help does not import torch
_MAX_ERROR_LINE = 400
_MIN_FREE_BYTES = 1 << 20  # an output image needs at most a few MiB; less than this free is surely too little

Outcome = tuple[dict, list[str]]  # (the JSON record, the lines printed without --json)


class UsageError(Exception):
    """A bad command line or unusable input: reported on one line, exit status 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog  # None: the running sub-command's


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`UsageError` (one line, no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')", self.prog)


# ---- reading inputs ------------------------------------------------------------------------------

def _read(reader: Callable[..., np.ndarray], source: str | Path | BinaryIO, name: str) -> np.ndarray:
    """``reader(source, name)`` (a :mod:`uio.images` reader), its errors as :class:`UsageError`."""
    try:
        return reader(source, name)
    except ValueError as err:  # ImageReadError: names the file and the problem
        raise UsageError(str(err)) from None


def read_image(path: str | Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 array (:func:`uio.images.read_image`); :class:`UsageError` if unusable."""
    return _read(images.read_image, path, str(path))


def read_mask(path: str | Path) -> np.ndarray:
    """A mask image as an HxW bool array (:func:`uio.images.read_mask`); :class:`UsageError` if unusable."""
    return _read(images.read_mask, path, str(path))


def demo_image() -> np.ndarray:
    """The bundled living-room picture (``uio/assets/demo.png``)."""
    from importlib import resources

    with resources.files("uio").joinpath("assets").joinpath("demo.png").open("rb") as f:
        return _read(images.read_image, f, "demo.png")


def _coordinate(text: str) -> float:
    """argparse type: a finite pixel coordinate."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a pixel coordinate (a number), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _text_len(text: str) -> int:
    """argparse type: an output text length in 1..MAX_TEXT_LEN."""
    value = _positive_int(text)
    if value > MAX_TEXT_LEN:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TEXT_LEN}, got {value}")
    return value


def _comma_list(text: str) -> list[str]:
    """argparse type: ``a,b,c`` -> ``["a", "b", "c"]`` (blank items dropped, at least one)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated answers like 'cat,dog', got {text!r}")
    return items


def check_box(box: Sequence[float], image: np.ndarray) -> list[float]:
    """``[x1, y1, x2, y2]`` if it is a non-empty box inside ``image`` (:func:`uio.checks.check_box`), else
    :class:`UsageError`."""
    try:
        return checks.check_box(box, image, "box")
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _nearest_existing(folder: Path) -> Path:
    """``folder``, or its closest ancestor that exists (saving creates the missing ones)."""
    return next(p for p in (folder, *folder.parents) if p.exists())


def _check_writable(path: Path) -> None:
    """UsageError unless ``path`` (or a new file in its folder) can be written now."""
    try:
        if path.exists():
            open(path, "ab").close()  # opens for writing without changing the file
        else:
            with tempfile.TemporaryFile(dir=_nearest_existing(path.parent)):
                pass
    except OSError as err:
        raise UsageError(f"output file {path}: cannot write there ({err.strerror or err})") from None


def check_output_path(path: Path | None, count: int = 1) -> None:
    """Fail before any work on an output image file that could not be saved.

    ``count`` files are written when several decodes are shown (``out-1.png``...).
    """
    if path is None:
        return
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"output file {path}: unknown image file extension (use .png or .jpg)")
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise UsageError(f"output file {path}: {folder} is a file, not a folder")
    for index in range(count):
        file = Path(numbered(str(path), index, count))
        if file.is_dir():
            raise UsageError(f"output file {file}: is a folder; give a file name such as {file / 'out.png'}")
        _check_writable(file)
    free = shutil.disk_usage(folder).free
    if free < _MIN_FREE_BYTES:
        raise UsageError(f"output file {path}: only {free:,} bytes free in {folder}; free some space or write elsewhere")


# ---- the task arguments --------------------------------------------------------------------------

def _add_arg(parser: argparse.ArgumentParser, arg: Arg) -> None:
    """Declare ``arg`` on a sub-command's parser."""
    if arg.kind in ("image", "text"):
        parser.add_argument(arg.keyword, metavar=arg.metavar, help=arg.help or None)
    elif arg.kind == "box":
        for name in ("x1", "y1", "x2", "y2"):
            parser.add_argument(name, metavar=name.upper(), type=_coordinate,
                                help=arg.help if name == "x1" else argparse.SUPPRESS)
    elif arg.kind == "options":
        parser.add_argument("--options", type=_comma_list, metavar="A,B,...", help=arg.help)
    elif arg.kind == "masks":
        parser.add_argument("masks", nargs="+", metavar=arg.metavar, help=arg.help)
        parser.add_argument("--labels", nargs="+", required=True, metavar="LABEL",
                            help="what each mask shows, in the order of the masks")
    else:
        raise ValueError(f"unknown argument kind {arg.kind!r}")


def _read_arg(args: argparse.Namespace, arg: Arg, inputs: dict) -> dict:
    """The method keyword(s) for ``arg``, read and checked (earlier inputs are in ``inputs``)."""
    if arg.kind == "image":
        return {"image": read_image(args.image)}
    if arg.kind == "text":
        return {arg.keyword: getattr(args, arg.keyword)}
    if arg.kind == "box":
        return {"location": check_box([args.x1, args.y1, args.x2, args.y2], inputs["image"])}
    if arg.kind == "options":
        if args.options and args.num_decodes is not None:
            raise UsageError("--options cannot be combined with --num-decodes")
        return {"answer_options": args.options}
    return _read_masks(args.masks, args.labels)


def _read_masks(paths: Sequence[str], labels: Sequence[str]) -> dict:
    """Masks and labels for segmentation-based generation, checked for count and size."""
    from .tasks import GEN_SEGMENTATION_COLOR_NAMES

    if len(paths) != len(labels):
        raise UsageError(f"got {len(paths)} masks but {len(labels)} labels; give one label per mask")
    if len(paths) > len(GEN_SEGMENTATION_COLOR_NAMES):
        raise UsageError(f"at most {len(GEN_SEGMENTATION_COLOR_NAMES)} masks, got {len(paths)}")
    masks = [read_mask(path) for path in paths]
    for path, mask in zip(paths, masks):
        if mask.shape != masks[0].shape:
            raise UsageError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but {paths[0]} is "
                             f"{masks[0].shape[1]}x{masks[0].shape[0]}; masks must have the same size")
    return {"binary_masks": masks, "labels": list(labels)}


# ---- loading the model ---------------------------------------------------------------------------

def _check_device(name: str | None) -> None:
    """UsageError for a device torch does not know or cannot use here."""
    if name is None:
        return
    from .runner import resolve_device

    try:
        resolve_device(name)
    except ValueError as err:
        raise UsageError(f"--device: {err}") from None


def _check_model(model: str) -> None:
    if model not in MODEL_SIZES and not Path(model).is_file():
        raise UsageError(f"--model {model}: expected one of {', '.join(MODEL_SIZES)} or a config JSON file")


def _require_file(path: str | None, option: str) -> None:
    if path is not None and not Path(path).exists():
        raise UsageError(f"{option} {path}: no such file")


def _config_of_weights(weights: Path) -> str | None:
    """The model a converted checkpoint was made for: a size name, or the JSON written beside it."""
    from .checkpoint import read_metadata
    from .config import CONFIGS, VAE_CONFIG, config_to_dict

    try:
        stored = read_metadata(weights).get("uio_config")
    except Exception:  # not a safetensors file after all: loading it will say so clearly
        return None
    if stored is None:
        return None
    stored = json.loads(stored)
    for size, config in CONFIGS.items():
        if stored == json.loads(json.dumps(config_to_dict(config, VAE_CONFIG))):
            return size
    # A custom config (like the conformance tiny one): `uio convert` wrote it beside the file.
    sidecar = weights.with_suffix(".json")
    if sidecar.is_file():
        return str(sidecar)
    raise UsageError(f"{weights} was converted for a custom config; pass it with --model config.json")


def model_spec(args: argparse.Namespace) -> str:
    """``--model``, else the config recorded in a converted ``--weights`` file, else ``small``."""
    if args.model is not None:
        _check_model(args.model)
        if args.weights is None and args.model not in MODEL_SIZES:
            raise UsageError(f"--model {args.model}: a config file needs --weights (only released sizes download)")
        return args.model
    if args.weights is not None and Path(args.weights).suffix == ".safetensors":
        return _config_of_weights(Path(args.weights)) or "small"
    return "small"


def runner_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :meth:`ModelRunner.from_pretrained` the common options describe."""
    return {"size": model_spec(args), "weights": args.weights, "tokenizer": args.tokenizer, "device": args.device,
            "dtype": args.dtype, "seed": args.seed, "log_inputs": False, "prepack": args.prepack,
            "stop_at_eos": args.stop_at_eos}


def load_runner(args: argparse.Namespace):
    """The :class:`ModelRunner` the common options describe (downloads when --weights is absent)."""
    from .runner import ModelRunner

    return ModelRunner.from_pretrained(**runner_options(args))


def _check_model_args(args: argparse.Namespace) -> None:
    """Validate the common model options before any work is done."""
    _require_file(args.weights, "--weights")
    _require_file(args.tokenizer, "--tokenizer")
    model_spec(args)
    _check_device(args.device)


# ---- showing results -----------------------------------------------------------------------------

def _output_path(args: argparse.Namespace, name: str, output: str) -> Path | None:
    """``-o``, else ``<input stem>-<command>.png`` (``<command>.png`` without input) for spatial outputs."""
    if output not in SPATIAL_OUTPUTS:
        return None
    if args.output:
        return Path(args.output)
    image = getattr(args, "image", None)
    return Path(f"{Path(image).stem}-{name}.png" if image and image != "-" else f"{name}.png")


# ---- sub-commands --------------------------------------------------------------------------------

def show(request, result: dict, tokenizer, output: Path | None) -> Outcome:
    """Describe a result as the CLI does, saving its images to ``output`` (numbered for several decodes)."""
    from .requests import describe_request

    record, lines, pictures = describe_request(request, result, tokenizer, None if output is None else str(output))
    for name, picture in pictures.items():
        _save(picture, Path(name))
    return record, lines


def _save(image: Image.Image, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    except OSError as err:  # checked before the work, but a disk can fill up meanwhile
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # no truncated image left behind
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None


def _task_handler(name: str) -> Callable[[argparse.Namespace], Outcome]:
    """The handler of task ``name``'s sub-command: read and check inputs, load the model, run, show."""
    from .requests import TaskRequest

    task = TASKS[name]

    def handle(args: argparse.Namespace) -> Outcome:
        _check_model_args(args)
        output = _output_path(args, task.command, task.shows)
        check_output_path(output, args.num_decodes or 1)
        inputs: dict = {}
        for arg in task.args:
            inputs.update(_read_arg(args, arg, inputs))
        runner = load_runner(args)
        result = getattr(runner, name)(**inputs, num_decodes=args.num_decodes, beam_search=args.beam_search)
        request = TaskRequest(name, inputs, args.num_decodes, args.beam_search)
        return show(request, result, runner.tokenizer, output)

    return handle


def _cmd_run(args: argparse.Namespace) -> Outcome:
    """``uio run``: any prompt, with or without an image, text or image output."""
    _check_model_args(args)
    output = _output_path(args, "run", "image" if args.image_output else "text")
    check_output_path(output, args.num_decodes or 1)
    options = _read_arg(args, OPTIONS, {})["answer_options"]
    if options and args.image_output:
        raise UsageError("--options scores text answers; it cannot be combined with --image-output")
    if args.text_len == 1 and not args.image_output:
        raise UsageError("--text-len 1 leaves no room for text; use 2 or more (or --image-output)")
    from .requests import RUN, TaskRequest, run_requests

    image = None if args.image == "-" else read_image(args.image)
    inputs = {"image": image, "prompt": args.prompt, "text_len": args.text_len, "image_output": args.image_output,
              "answer_options": options}
    request = TaskRequest(RUN, inputs, args.num_decodes, args.beam_search)
    runner = load_runner(args)
    result = run_requests(runner, [request])[0]
    if isinstance(result, Exception):
        raise result
    return show(request, result, runner.tokenizer, output)


def _cmd_demo(args: argparse.Namespace) -> Outcome:
    """``uio demo``: the original README's example, VQA on the bundled living-room picture."""
    _check_model_args(args)
    image = demo_image()
    runner = load_runner(args)
    result = runner.vqa(image, DEMO_QUESTION, num_decodes=args.num_decodes, beam_search=args.beam_search)
    record, lines, _ = describe("demo", "text", result, Context(image), args.num_decodes)
    answer = [f"A: {lines[0]}"] if args.num_decodes is None else lines
    return {**record, "question": DEMO_QUESTION}, [f"Q: {DEMO_QUESTION}", *answer]


def _cmd_serve(args: argparse.Namespace) -> Outcome:
    """``uio serve``: load the model and serve it over HTTP until SIGTERM/SIGINT."""
    _check_model_args(args)
    try:
        from .server import ServerSettings, serve
    except ImportError as err:
        raise UsageError(f"uio serve needs the serve extra ({err.name} is not installed): "
                         "pip install 'unified-io[serve]'") from None
    settings = ServerSettings(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                              max_queue=args.max_queue, max_body_bytes=args.max_body_mb << 20, token=args.token)
    if args.ray:
        _serve_on_ray(args, settings)
    else:
        serve(lambda: load_runner(args), settings)
    return {"command": "serve", "host": args.host, "port": args.port}, ["uio serve: stopped"]


class _Progress(Mapping):
    """A read-only view of a parameter dict whose iteration shows a tqdm bar (one step per tensor)."""

    def __init__(self, params: Mapping, desc: str, disable: bool | None):
        self._params, self._desc, self._disable = params, desc, disable

    def __getitem__(self, key):
        return self._params[key]

    def __len__(self) -> int:
        return len(self._params)

    def __iter__(self) -> Iterator:
        from tqdm import tqdm

        return iter(tqdm(self._params, desc=self._desc, unit="tensor", disable=self._disable, file=sys.stderr))


def _dtype_names(params: Mapping) -> str:
    return ",".join(sorted({str(leaf.dtype).removeprefix("torch.") for leaf in params.values()}))


def _infer_model(params: Mapping, src: Path) -> str:
    from .checkpoint import infer_size

    size = infer_size(params)
    if size is None:
        raise UsageError(f"{src}: its parameters match none of the released sizes ({', '.join(MODEL_SIZES)}); "
                         "pass --model SIZE or --model config.json")
    return size


def _cmd_convert(args: argparse.Namespace) -> Outcome:
    """``uio convert``: a ``.bin`` (or ``.safetensors``) checkpoint to ``.safetensors``, validated."""
    import torch

    from . import checkpoint
    from .config import config_to_dict, load_config
    from .model.transformer import UnifiedIO
    from .runner import resolve_dtype

    src, dst = Path(args.src), Path(args.dst)
    _require_file(args.src, "SRC")
    if dst.suffix != ".safetensors":
        raise UsageError(f"DST {dst}: the converted file's name must end in .safetensors")
    if dst.resolve() == src.resolve():
        raise UsageError("SRC and DST are the same file")
    if args.model is not None:
        _check_model(args.model)
    start = time.perf_counter()
    params = checkpoint.load_checkpoint_file(src)
    model = args.model or _infer_model(params, src)
    config, vae_config = load_config(model)
    with torch.device("meta"):
        network = UnifiedIO(config, vae_config)
    checkpoint.validate(params, checkpoint.expected_params(network), str(src))
    config_dict = config_to_dict(config, vae_config)
    metadata = {"uio_config": json.dumps(config_dict), "format": "uio-flax-paths"}
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    checkpoint.write_safetensors(_Progress(params, dst.name, True if args.json else None), dst, dtype,
                                 metadata=metadata)
    sidecar = dst.with_suffix(".json")
    sidecar.write_text(json.dumps(config_dict, indent=1) + "\n")
    record = {"command": "convert", "source": str(src), "destination": str(dst), "config_file": str(sidecar),
              "model": model, "dtype": args.dtype or _dtype_names(params), "tensors": len(params),
              "parameters": int(sum(int(np.prod(leaf.shape)) for leaf in params.values())),
              "source_bytes": src.stat().st_size, "destination_bytes": dst.stat().st_size,
              "seconds": round(time.perf_counter() - start, 3)}
    return record, [
        f"converted {src} -> {dst} in {record['seconds']:.1f} s",
        f"  model {model}: {record['parameters']:,} parameters in {record['tensors']} tensors, {record['dtype']}",
        f"  size {_bytes(record['source_bytes'])} -> {_bytes(record['destination_bytes'])}",
        f"  config written to {sidecar}"]


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _cmd_download(args: argparse.Namespace) -> Outcome:
    """``uio download``: fetch the vocabulary (and a checkpoint) into the cache."""
    from . import hub

    files = {"tokenizer": hub.tokenizer_path()}
    if not args.tokenizer_only:
        files["checkpoint"] = hub.checkpoint_path(args.size)
    record = {"command": "download", "cache_dir": str(hub.cache_dir()), **{k: str(v) for k, v in files.items()}}
    return record, [f"{name}: {path}" for name, path in files.items()]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unified-io")
    except PackageNotFoundError:
        return "unknown"


def _cmd_info(args: argparse.Namespace) -> Outcome:
    """``uio info``: versions, device, cache folder and what it holds."""
    import platform

    import torch

    from . import hub
    from .runner import default_device

    root = hub.cache_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    record = {"command": "info", "version": _version(), "python": platform.python_version(),
              "torch": torch.__version__, "device": default_device(), "gpu": gpu, "cache_dir": str(root),
              "offline": hub.is_offline(),
              "cached_files": [{"path": str(p), "bytes": p.stat().st_size} for p in files]}
    lines = [f"unified-io {record['version']} (Python {record['python']}, torch {record['torch']})",
             f"device: {record['device']}" + (f" ({gpu})" if gpu else ""),
             f"cache: {root}" + (" (offline)" if record["offline"] else ""),
             *(f"  {p.relative_to(root)}  {_bytes(p.stat().st_size)}" for p in files)]
    if not files:
        lines.append("  (empty)")
    return record, lines


# ---- the parser ----------------------------------------------------------------------------------

def _common_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """Parent parsers: ``--json`` (every sub-command), the model options with and without the
    decoding options (commands that run one request, and ``serve``, whose requests choose)."""
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return base, _model_parser(decoding=True), _model_parser(decoding=False)


def _model_parser(decoding: bool) -> argparse.ArgumentParser:
    model = argparse.ArgumentParser(add_help=False)
    group = model.add_argument_group("model options")
    group.add_argument("--model", metavar="SIZE|CONFIG", help="small, base, large, xl or a config JSON "
                       "(default: small, or the config stored in a converted --weights file)")
    group.add_argument("--weights", metavar="PATH", help=".bin or .safetensors checkpoint "
                       "(default: the released one, downloaded into the cache)")
    group.add_argument("--tokenizer", metavar="PATH", help="spiece.model (default: t5-base's, from the cache)")
    group.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    group.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="transformer precision (default fp32)")
    if decoding:
        group.add_argument("--num-decodes", type=_positive_int, metavar="N",
                           help="return N beams/samples, best first (default: one)")
        search = group.add_mutually_exclusive_group()
        search.add_argument("--beam-search", dest="beam_search", action="store_const", const=True,
                            help="decode with beam search (default for text outputs)")
        search.add_argument("--sample", dest="beam_search", action="store_const", const=False,
                            help="decode by top-p sampling (default for image outputs and pose)")
    group.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    group.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                       help="on the CPU, keep packed copies of the decoder's weights: more memory, faster "
                            "decoding (default: only without uio's CPU kernels, which serve up to 32 rows at a time)")
    group.add_argument("--stop-at-eos", action="store_true",
                       help="stop decoding text once it has ended: faster short answers, same text, scores "
                            "count only the steps run (default: decode every step, as the original)")
    return model


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="image to write (default: <image name>-<command>.png in the current folder)")


def _serve_on_ray(args: argparse.Namespace, settings) -> None:
    try:
        from . import ray_serve
    except ImportError as err:
        raise UsageError(f"uio serve --ray needs the ray extra ({err.name} is not installed): "
                         "pip install 'unified-io[serve,ray]'") from None
    ray_serve.run(runner_options(args), settings, args.address, args.replicas, args.gpus_per_replica)


def _add_serve(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("server options")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                       help="examples per model call, at most (default 8)")
    group.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                       help="how long a request waits for others to batch with (default 10)")
    group.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                       help="requests waiting at most; more are answered 503 (default 64)")
    group.add_argument("--max-body-mb", type=_positive_int, default=20, metavar="MB",
                       help="largest request body, in MiB (default 20)")
    group.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /v1/ requests "
                                       "(default: none; set one when listening beyond this machine)")
    from .cli_batch import add_ray_options

    add_ray_options(p, "serve the app on Ray Serve, each replica with its own model")
    p.set_defaults(handler=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``uio`` parser with every sub-command; each sets ``handler``."""
    parser = _Parser(prog="uio", description="Run Unified-IO from the command line.",
                     epilog="Exit status: 0 ok, 1 failure (checkpoint, download, model), 2 bad usage or input.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    base, model, serving = _common_parsers()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, task in TASKS.items():
        p = sub.add_parser(task.command, parents=[base, model], help=task.help, description=task.help + ".")
        for arg in task.args:
            _add_arg(p, arg)
        if task.shows in SPATIAL_OUTPUTS:
            _add_output(p)
        p.set_defaults(handler=_task_handler(name))
    p = sub.add_parser("run", parents=[base, model], help="run any prompt (IMAGE - for none)",
                       description="Run the model on an arbitrary prompt.")
    p.add_argument("image", metavar="IMAGE|-", help="input image file, or - for a text-only prompt")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--image-output", action="store_true", help="generate an image (saved with -o)")
    p.add_argument("--text-len", type=_text_len, metavar="N",
                   help=f"output text length, 1..{MAX_TEXT_LEN} (default 32; 1 with --image-output)")
    p.add_argument("--options", type=_comma_list, metavar="A,B,...", help=OPTIONS.help)
    _add_output(p)
    p.set_defaults(handler=_cmd_run)
    p = sub.add_parser("demo", parents=[base, model], help=f"answer '{DEMO_QUESTION}' about a bundled picture",
                       description="The original README's example: VQA on a bundled living-room picture.")
    p.set_defaults(handler=_cmd_demo)
    _add_serve(sub.add_parser("serve", parents=[base, serving], help="serve every task over HTTP, with a web page",
                              description="Serve every task over HTTP (POST /v1/TASK), with a web page at / "
                                          "and dynamic batching. Needs the serve extra: pip install "
                                          "'unified-io[serve]'."))
    p = sub.add_parser("convert", parents=[base], help="convert a checkpoint to .safetensors",
                       description="Validate a checkpoint and write it as .safetensors, with its config "
                                   "as DST.json beside it.")
    p.add_argument("src", metavar="SRC", help="released .bin (or a .safetensors)")
    p.add_argument("dst", metavar="DST", help="output .safetensors")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast to this dtype (default: keep the source's)")
    p.add_argument("--model", metavar="SIZE|CONFIG", help="size or config JSON (default: inferred from SRC)")
    p.set_defaults(handler=_cmd_convert)
    p = sub.add_parser("download", parents=[base], help="download a checkpoint and the vocabulary into the cache")
    p.add_argument("size", nargs="?", default="small", choices=MODEL_SIZES, metavar="SIZE",
                   help=f"one of {', '.join(MODEL_SIZES)} (default small)")
    p.add_argument("--tokenizer-only", action="store_true", help="only the t5-base vocabulary")
    p.set_defaults(handler=_cmd_download)
    p = sub.add_parser("info", parents=[base], help="show versions, device and the cache")
    p.set_defaults(handler=_cmd_info)
    from . import cli_batch

    cli_batch.add_parser(sub, [base, model])
    return parser


# ---- entry point ---------------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    """Make numpy values and paths JSON-serializable."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__} as JSON")


def _error(prog: str, err: BaseException) -> None:
    """Print ``prog: error: message`` on stderr; over-long lines are cut."""
    lines = [line if len(line) <= _MAX_ERROR_LINE else line[:_MAX_ERROR_LINE] + " ..."
             for line in (str(err) or type(err).__name__).splitlines()]
    print(f"{prog}: error: " + "\n".join(lines), file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a prompt cut to max_input_len...) on one line, like errors, without a source line."""
    print(f"uio: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``uio`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _show_warning
            record, lines, *status = args.handler(args)  # a handler may add an exit status (uio batch)
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    except UsageError as err:
        _error(err.prog or f"uio {args.command}", err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("uio: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError, hub errors, model errors
        _error("uio", err)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(record, default=_json_default))
    else:
        print("\n".join(lines))
    return status[0] if status else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

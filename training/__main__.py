"""Command line: `python -m training {train,export,evaluate,sample,quantize,decode-graph} --help`.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from training.environment import BACKENDS, quiet_tensorflow
from training.speed import JIT_CHOICES, PIPELINES, PRECISIONS

# Before anything imports TensorFlow: its CUDA start-up errors mean nothing without a GPU.
quiet_tensorflow()


def _models_dir_default() -> Path:
    """Where the service looks: $CHARLSTM_MODELS_DIR, as `python -m app` reads it."""
    return Path(os.environ.get("CHARLSTM_MODELS_DIR", "models"))


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve", action="store_true",
                   help="then have the service at --url serve the model: a running one loads "
                   "it live (POST /admin/reload, $CHARLSTM_API_KEY if keys are set), and if "
                   "none answers, one is started in the foreground on --models-dir")
    p.add_argument("--url", default=None,
                   help="service address for --serve; default: $CHARLSTM_URL, else "
                   "http://$CHARLSTM_HOST:$CHARLSTM_PORT (http://127.0.0.1:8000)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show: required options,
    options whose default is None (their help says what happens) and on/off flags."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train", help="train a char-RNN on a text corpus",
        description="Train a character-level LSTM/GRU language model. Every character of the "
        "training split is a target once per epoch; the best weights by validation loss are "
        "kept as RUN_DIR/best.weights.h5 and the last full checkpoint (for --resume) as "
        "RUN_DIR/last.keras, with a CSV log, a loss plot and samples per epoch. A run folder that "
        "already holds a run is refused unless --resume (continue it) or --force (start over). "
        "With --name the run is then exported into the models folder, and with --serve served: "
        "`train my.txt --name mine --serve` goes from a text file to a model answering over HTTP.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("corpus", nargs="+",
                   help="UTF-8 text file(s), or one named corpus (shakespeare, nietzsche) that "
                   "is downloaded once into the cache ($CHARLSTM_CACHE or ~/.cache/charlstm)")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="run folder for checkpoints, log.csv, loss.png and samples.txt; "
                   "required unless --name is given (then runs/NAME)")
    p.add_argument("--name", default=None,
                   help="then export the best weights as model NAME into --models-dir (as "
                   "`export` does); an existing model of that name is replaced only with "
                   "--force or --resume")
    p.add_argument("--models-dir", type=Path, default=_models_dir_default(),
                   help="models folder for --name ($CHARLSTM_MODELS_DIR, else models)")
    p.add_argument("--lowercase", action="store_true", help="lowercase the text first")
    p.add_argument("--normalize", choices=["none", "NFC", "NFKC"], default="none",
                   help="put the text in this Unicode normalisation form (after --lowercase): "
                   "NFC composes 'e' + U+0301 into 'é', NFKC also folds compatibility forms "
                   "('ﬁ' -> 'fi', full-width letters); recorded in model.json, and the service "
                   "applies it to seeds and stop strings, so either spelling of a character "
                   "reaches the model")
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm", help="recurrent cell")
    p.add_argument("--layers", type=int, default=2, help="number of stacked recurrent layers")
    p.add_argument("--units", type=int, default=256, help="units per recurrent layer")
    p.add_argument("--embedding-dim", type=int, default=64, help="character embedding size")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout after each layer")
    p.add_argument("--seq-len", type=int, default=100, help="characters per training window")
    p.add_argument("--batch-size", type=int, default=64, help="windows per batch")
    p.add_argument("--epochs", type=int, default=20, help="last epoch to train to")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--clipnorm", type=float, default=5.0, help="gradient norm clip")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation = this last fraction of the text")
    p.add_argument("--patience", type=int, default=4,
                   help="stop after this many epochs without a better validation loss")
    p.add_argument("--seed", type=int, default=1234, help="random seed for a reproducible run")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint up to --epochs "
                       "(with the run's own --seq-len, --val-fraction and --stateful)")
    again.add_argument("--force", action="store_true",
                       help="start a new run in --out even if it holds one (deletes its "
                       "checkpoints, log and samples)")
    p.add_argument("--stateful", action="store_true",
                   help="truncated BPTT over the whole text: --batch-size parallel streams "
                   "read in order, the LSTM state carried from each window to the next (reset "
                   "at each epoch start) instead of shuffled windows from a zero state; "
                   "validation is measured the same way either way; TensorFlow backend, one "
                   "device")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="Keras backend (default: $KERAS_BACKEND, else tensorflow); jax trains on "
                   "a GPU where TensorFlow has no GPU build (export still needs TensorFlow)")
    speed = p.add_argument_group(
        "speed", "settings that change characters per second, not the model; unset, a CPU-only "
        "host gets the fastest measured by `python -m bench.training` (printed at the start and "
        "recorded in config.json and model.json), a GPU host Keras's own")
    speed.add_argument("--threads", type=int, default=None,
                       help="intra-op threads (TF_NUM_INTRAOP_THREADS, or XLA_FLAGS for jax); "
                       "0: one per core")
    speed.add_argument("--jit-compile", choices=JIT_CHOICES, default=None,
                       help="compile the train step with XLA (auto: Keras decides; on a CPU "
                       "TensorFlow does not)")
    speed.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="mixed_bfloat16: bf16 compute, float32 weights (kept by --resume)")
    window = speed.add_mutually_exclusive_group()
    window.add_argument("--fixed-window", dest="fixed_window", action="store_true",
                        default=None, help="build the training graph for windows of exactly "
                        "--seq-len characters (a recurrent loop of known length)")
    window.add_argument("--any-window", dest="fixed_window", action="store_false",
                        help="build it for windows of any length")
    speed.add_argument("--pipeline", choices=PIPELINES, default=None,
                       help="how batches reach Keras on TensorFlow (jax always takes arrays)")
    p.add_argument("--distribute", choices=["auto", "none", "mirrored"], default="auto",
                   help="auto: MirroredStrategy when several GPUs (or --cpu-devices) are visible")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="split the CPU into this many logical devices (tests of multi-device "
                   "training without GPUs)")
    p.add_argument("--sample-length", type=int, default=200,
                   help="characters sampled at each of 0.2/0.5/1.0/1.2 after every epoch")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="cap batches per epoch (quick experiments); default: the whole split")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no callback messages, only a line per epoch (when "
                   "output is not a terminal there is never a progress bar)")
    _add_serve_options(p)


def _export_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to models/<name>/ (ONNX + model.json), verified",
        description="Convert RUN_DIR/best.weights.h5 to model.onnx with explicit input/output "
        "names and dynamic batch and time, check it against Keras (logits and states within 1e-4, "
        "greedy decoding of 200 characters identical), evaluate it on the validation split (the "
        "three measures of `evaluate`), add decode graphs (K = 1 and 8, checked like "
        "`decode-graph`) and write model.json, the loss plot and samples. Any failed check fails "
        "the export. The folder is built hidden and renamed into place, so a running service "
        "never sees a part of it. An existing model folder is replaced only with --force.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="a run folder written by `train`")
    p.add_argument("--name", required=True, help="model name; the folder under --models-dir")
    p.add_argument("--models-dir", type=Path, default=_models_dir_default(),
                   help="artifact root ($CHARLSTM_MODELS_DIR, else models)")
    p.add_argument("--checkpoint", default="best.weights.h5", help="weights file in RUN_DIR")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max abs difference allowed between ONNX and Keras outputs")
    p.add_argument("--force", action="store_true",
                   help="replace MODELS_DIR/NAME if it exists (a running `python -m app` "
                   "loads the new one live and finishes running generations on the old)")
    _add_serve_options(p)


def _add_validation_options(p: argparse.ArgumentParser, window_help: str) -> None:
    """The model and the validation text it is scored on (`evaluate`, `quantize`)."""
    p.add_argument("model_dir", type=Path, help="folder with model.onnx and model.json")
    p.add_argument("text", nargs="*", type=Path,
                   help="text file(s); default: the corpus files named in model.json")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="score the last fraction of the text; 1 scores all of it; default: the "
                   "model's validation fraction from model.json")
    p.add_argument("--window", type=int, default=None,
                   help=f"{window_help}; default: the training window from model.json")


def _evaluate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "evaluate", help="validation loss of an exported model, with onnxruntime",
        description="Mean cross-entropy (nats/char and bits/char) of an exported ONNX model on "
        "the validation text, three ways: windows of the training length from a zero state (as "
        "training measured val_loss), windows of 256 from a zero state (like nanoGPT's "
        "evaluation), and one pass over the whole text with the state carried (as the service "
        "runs). --update records all three in the model's model.json.",
        formatter_class=_HelpFormatter,
    )
    _add_validation_options(p, "characters per window of the first measure")
    p.add_argument("--update", action="store_true",
                   help="write the three figures into MODEL_DIR/model.json (atomically, other "
                   "fields kept); needs the model's own corpus and measures")


def _sample_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sample", help="generate text from an exported model",
        description="Prime the model with --seed-text, then sample one continuation per "
        "temperature with onnxruntime.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model_dir", type=Path, help="folder with model.onnx and model.json")
    p.add_argument("--seed-text", default="\n", help="text to continue")
    p.add_argument("-t", "--temperature", type=float, action="append",
                   help="sampling temperature (repeatable); default 0.2 0.5 1.0 1.2")
    p.add_argument("-n", "--length", type=int, default=400, help="characters to generate")
    p.add_argument("--seed", type=int, default=None, help="random seed")


def _quantize_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "quantize", help="add an int8 CPU variant (model.int8.onnx) to an exported model",
        description="Quantize model.onnx with onnxruntime's dynamic int8 quantization, score it "
        "next to the fp32 graph on the validation split (windows of the training length from a "
        "zero state) and list it in model.json under `variants`; refused, with nothing written, "
        "when it loses more than --max-increase nats/char. Needs no TensorFlow.",
        formatter_class=_HelpFormatter,
    )
    _add_validation_options(p, "characters per window")
    p.add_argument("--max-increase", type=float, default=0.01,
                   help="largest validation loss increase over fp32 accepted, nats/char")


def _decode_graph_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "decode-graph", help="add decode graphs (K steps with in-graph sampling) to a model",
        description="Build decode graphs from model.onnx (or a variant): the step graph and the "
        "service's sampler in one ONNX graph that advances each row K characters per call. "
        "Each is checked against the step graph with the host sampler on the same uniforms and "
        "listed in model.json under `decode_graphs`; its weights are read from the step graph "
        "file, so it adds kilobytes. Needs no TensorFlow.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model_dir", type=Path, help="folder with model.onnx and model.json")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 8],
                   help="K: characters per call, one graph each")
    p.add_argument("--variant", default=None,
                   help="build from this listed variant (e.g. int8) instead of model.onnx")
    p.add_argument("--no-details", action="store_true",
                   help="leave out the temperature-1 probability outputs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train character-level LSTM/GRU language models and export them for the "
        "service: train -> export -> evaluate / sample.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _export_parser(sub)
    _evaluate_parser(sub)
    _sample_parser(sub)
    _quantize_parser(sub)
    _decode_graph_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from app.artifact import ArtifactError
    from training.corpus import CorpusError
    from training.serve import ServeError

    try:
        if args.command == "train":
            _check_train_args(parser, args)
            if not _train(args, argv) or args.name is None:
                return 0
            print(f"exporting {args.out} as {args.models_dir / args.name}", flush=True)
            code = _export_in_a_new_process(args.out, args.name, args.models_dir,
                                            replace=args.force or args.resume)
            if code or not args.serve:
                return code
            _serve(args.models_dir / args.name, args.url)
        elif args.command == "export":
            target = args.models_dir / args.name
            if target.exists() and not args.force:
                raise FileExistsError(f"{target} already exists: pass --force to replace it, or "
                                      "choose another --name")
            from training.environment import import_tensorflow
            from training.export import export

            import_tensorflow()
            out = export(args.run_dir, args.name, args.models_dir, checkpoint=args.checkpoint,
                         opset=args.opset, tolerance=args.tolerance)
            print(f"exported {out}", flush=True)
            if args.serve:
                _serve(out, args.url)
        elif args.command == "evaluate":
            from training.evaluate import evaluate_cli

            evaluate_cli(args.model_dir, args.text, args.val_fraction, args.window, args.update)
        elif args.command == "sample":
            from training.evaluate import sample_cli

            sample_cli(args.model_dir, args.seed_text, args.temperature or [0.2, 0.5, 1.0, 1.2],
                       args.length, args.seed)
        elif args.command == "quantize":
            from training.quantize import quantize_int8

            variant = quantize_int8(args.model_dir, args.text, args.val_fraction, args.window,
                                    args.max_increase)
            print(f"wrote {args.model_dir / variant.file}")
        elif args.command == "decode-graph":
            from training.decode_artifact import add_decode_graphs

            add_decode_graphs(args.model_dir, tuple(args.steps), args.variant,
                              details=not args.no_details)
    except (CorpusError, ArtifactError, ValueError, FileExistsError, ServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse now what would fail only after training: no run folder, a model that would be
    replaced without being told to."""
    if args.serve and args.name is None:
        parser.error("--serve needs --name (the model to export and serve)")
    if args.out is None:
        if args.name is None:
            parser.error("-o/--out is required (or --name NAME, which trains into runs/NAME)")
        args.out = Path("runs") / args.name
    if args.name is not None:
        from app.artifact import check_model_name

        check_model_name(args.name)
        target = args.models_dir / args.name
        if target.exists() and not (args.force or args.resume):
            raise FileExistsError(f"{target} already exists: pass --force to train anew and "
                                  "replace it, --resume to continue its run, or choose another "
                                  "--name")


def _train(args: argparse.Namespace, argv: list[str] | None) -> bool:
    """Train; True if the run has weights to export."""
    from training.environment import choose_backend, gpu_wanted, import_tensorflow
    from training.speed import apply_threads, chosen_speed

    backend = choose_backend(args.backend)
    speed, source = chosen_speed(gpu_wanted(), threads=args.threads,
                                 jit_compile=args.jit_compile, precision=args.precision,
                                 fixed_window=args.fixed_window, pipeline=args.pipeline)
    print(f"speed settings from {source}", flush=True)
    from training.train import TrainOptions, check_resume, train

    # A progress bar only on a terminal: in a file it is control codes and backspaces.
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    opts = TrainOptions(
        corpus=args.corpus, run_dir=args.out, lowercase=args.lowercase,
        normalization=None if args.normalize == "none" else args.normalize, cell=args.cell,
        layers=args.layers, units=args.units, embedding_dim=args.embedding_dim,
        dropout=args.dropout, seq_len=args.seq_len, batch_size=args.batch_size,
        epochs=args.epochs, learning_rate=args.lr, clipnorm=args.clipnorm,
        val_fraction=args.val_fraction, patience=args.patience, seed=args.seed,
        resume=args.resume, distribute=args.distribute, cpu_devices=args.cpu_devices,
        sample_length=args.sample_length, steps_per_epoch=args.steps_per_epoch,
        stateful=args.stateful, force=args.force, verbose=verbose,
        command=["python", "-m", "training", *(argv if argv is not None else sys.argv[1:])],
        speed=speed,
    )
    if opts.resume:  # a resume the run cannot take is refused before TensorFlow's start-up
        check_resume(opts)
    apply_threads(backend, speed.threads)  # before the backend is imported
    if backend == "tensorflow":  # before train imports Keras
        import_tensorflow()
    result = train(opts)
    if result.chars_per_s is not None:
        print(f"throughput: {result.chars_per_s:,.0f} target characters per second of training "
              "(validation and samples not counted)", flush=True)
    if result.best_epoch is None or result.best_val_loss is None:
        print(f"no epoch trained (already at --epochs {args.epochs}?); best weights, if "
              f"any: {result.checkpoint}", flush=True)
        return result.checkpoint.is_file()
    loss = result.best_val_loss
    print(f"best: epoch {result.best_epoch}, validation loss {loss:.4f} nats/char "
          f"({loss / math.log(2):.4f} bits/char), weights {result.checkpoint}", flush=True)
    if args.name is None:
        print(f"export it: python -m training export {args.out} --name NAME")
    return True


def _export_in_a_new_process(run_dir: Path, name: str, models_dir: Path, replace: bool) -> int:
    """`export` as a process of its own, as after a separate `train`: the conversion needs
    TensorFlow's Keras with the GPU hidden, which the training process (on a GPU, or with the
    JAX backend) can no longer give it."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    cmd = [sys.executable, "-m", "training", "export", str(run_dir), "--name", name,
           "--models-dir", str(models_dir), *(["--force"] if replace else [])]
    return subprocess.run(cmd, env=env, check=False).returncode


def _serve(model_dir: Path, url: str | None) -> None:
    from training.serve import default_url, serve

    serve(model_dir, (url or default_url()).rstrip("/"))


if __name__ == "__main__":
    sys.exit(main())

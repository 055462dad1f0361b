"""``flotilla-agent``: run the agent, simulate a fleet, predict, show local state, self-test.

flotilla-agent run --config /etc/flotilla-agent.toml
flotilla-agent run --server URL --token TOKEN --state-dir DIR
flotilla-agent simulate --devices 50 --server URL --token TOKEN [--dataset activity] [--processes]
flotilla-agent predict --state-dir DIR --input '[0.0, 0.1, ...]'   # through the running agent
flotilla-agent status --state-dir DIR
flotilla-agent selftest [--train]
flotilla-agent bundle --model my_model.py:Net --input-shape 3,64 --out bundle/   # on a workstation
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devices_agent.config import AgentConfig, ConfigError, load_config

__all__ = ["main"]


def _setup_logging(path: Path | None, *, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _config_from_args(args: argparse.Namespace) -> AgentConfig:
    if args.config:
        config = load_config(args.config)
        if args.state_dir:
            config.state_dir = Path(args.state_dir)
        return config
    if not args.server or not args.state_dir:
        raise ConfigError("give --config FILE, or --server URL --state-dir DIR (and --token on first run)")
    return AgentConfig(
        server_url=args.server,
        enrollment_token=args.token or "",
        state_dir=Path(args.state_dir),
        name=args.name or "",
        tags=list(args.tag or []),
        heartbeat_interval_s=args.interval,
        websocket=not args.no_websocket,
        allow_insecure_http=args.allow_insecure_http,
        server_cert_sha256=args.server_cert_sha256,
        ca_file=args.ca_file,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from devices_agent.agent import Agent, EnrollmentError
    from devices_agent.client import AuthError
    from devices_agent.state import KeyMismatchError

    config = _config_from_args(args)
    _setup_logging(config.log_path, verbose=args.verbose)
    agent = Agent(config=config)

    def _stop(signum: int, frame: Any) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.run(max_steps=args.max_steps)
    except EnrollmentError as exc:
        logging.getLogger("devices_agent").error("%s", exc)
        return 2
    except (AuthError, KeyMismatchError) as exc:
        # Decommissioned, revoked, or a different server: retrying cannot help, and a
        # service manager restarting us in a loop would only hammer the server.
        logging.getLogger("devices_agent").error("credentials refused: %s", exc)
        return 3
    finally:
        agent.close()
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from devices_agent.simulate import Fleet

    _setup_logging(None, verbose=args.verbose)
    state_root = Path(args.state_root or tempfile.mkdtemp(prefix="flotilla-fleet-"))
    fleet = Fleet(
        server_url=args.server,
        token=args.token,
        devices=args.devices,
        state_root=state_root,
        dataset=args.dataset,
        processes=args.processes,
        seed=args.seed,
        alpha=args.alpha,
        heartbeat_interval_s=args.interval,
        slow_fraction=args.slow_fraction,
        slow_delay_ms=args.slow_delay_ms,
        threads=args.threads,
        inferences_per_cycle=args.inferences,
        train=not args.no_train,
    )
    stop = {"now": False}

    def _stop(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"simulating {args.devices} devices under {state_root}", file=sys.stderr)
    fleet.start()
    started = time.monotonic()
    try:
        while not stop["now"] and (args.duration is None or time.monotonic() - started < args.duration):
            time.sleep(1.0)
            if int(time.monotonic() - started) % 10 == 0:
                print(json.dumps(fleet.stats.as_dict()), file=sys.stderr)
    finally:
        fleet.stop()
    print(json.dumps(fleet.stats.as_dict()))
    return 0


def _predict_offline(state_dir: Path, inputs: Any, *, batch: bool) -> dict[str, Any]:
    """Run the installed model from the state directory, as the agent's local API would."""
    from devices_agent.learning import ModelRuntime
    from devices_agent.local_api import LocalService
    from devices_agent.outbox import BufferedRecorder, Outbox
    from devices_agent.samples import SampleStore
    from devices_agent.state import AgentState

    state = AgentState(state_dir)
    outbox = Outbox(state.outbox_path)
    recorder = BufferedRecorder(outbox)
    store = SampleStore(state.root / "samples.sqlite3")
    try:
        service = LocalService(model=ModelRuntime(state).active, store=store, record=recorder.add)
        return service.predict(inputs, batch=batch)
    finally:
        recorder.flush()
        outbox.close()
        store.close()


def _cmd_predict(args: argparse.Namespace) -> int:
    """A prediction through the running agent's local API, or from the state directory."""
    from devices_agent.local_api import LocalApiError as ServiceRefused
    from devices_agent.local_client import AgentClient, LocalApiError

    raw = args.input
    if raw.startswith("@"):
        raw = Path(raw[1:]).read_text()
    try:
        inputs = json.loads(raw)
    except ValueError as exc:
        print(json.dumps({"error": "malformed", "message": f"--input is not JSON: {exc}"}))
        return 2
    state_dir = Path(args.state_dir).expanduser() if args.state_dir else None
    address = args.socket or (str(state_dir / "agent.sock") if state_dir else "")
    if not address:
        print(json.dumps({"error": "usage", "message": "give --state-dir or --socket"}))
        return 2
    try:
        with AgentClient(address) as client:
            found = client.predict(inputs, batch=True) if args.batch else [client.predict(inputs)]
        answer = {"version_id": found[0]["version_id"], "model": found[0]["model"], "predictions": found}
    except LocalApiError as exc:
        print(json.dumps({"error": exc.code, "message": exc.message}))
        return 1
    except OSError as exc:
        if state_dir is None or args.socket:
            print(json.dumps({"error": "agent_unreachable", "message": f"{address}: {exc}"}))
            return 1
        # No agent running: the same service over the installed model, metrics to the outbox.
        try:
            answer = _predict_offline(state_dir, inputs, batch=args.batch)
        except ServiceRefused as refused:
            print(json.dumps({"error": refused.code, "message": refused.message}))
            return 1
    print(json.dumps(answer))
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    """Prove this board can serve (and with --train, train) models: a real inference and step."""
    from devices_agent.selftest import selftest

    report = selftest(train=args.train)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def _load_model(ref: str, weights: str | None) -> Any:
    """``file.py:Name`` or ``package.module:Name``: a class (built with no arguments) or a function."""
    import importlib
    import importlib.util

    where, _, name = ref.rpartition(":")
    if not where or not name:
        raise ValueError(f"--model must be FILE.py:NAME or MODULE:NAME, got {ref!r}")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"--model: no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"--model: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # the model's own imports of its neighbours
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    factory = getattr(module, name, None)
    if factory is None:
        raise ValueError(f"--model: {where} has no {name!r}")
    model = factory()
    if weights:
        import torch
        from safetensors.numpy import load_file

        state = {k: torch.from_numpy(v) for k, v in load_file(weights).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"--weights does not fit the model: missing {missing}, unexpected {unexpected}")
    return model


def _cmd_bundle(args: argparse.Namespace) -> int:
    """Turn a PyTorch model into the three files the registry takes (program, weights, ONNX)."""
    import torch

    from devices_agent.program import ProgramError, make_bundle, sample_inputs

    try:
        shape = [int(d) for d in args.input_shape.split(",") if d.strip()]
        model = _load_model(args.model, args.weights)
        example = torch.from_numpy(sample_inputs(shape, args.input_dtype, n=8))
        head = [h for h in (args.head or "").split(",") if h] or None
        made = make_bundle(model, example, out_dir=args.out, head=head, opset=args.opset)
    except (ValueError, ProgramError, OSError) as exc:
        print(f"flotilla-agent bundle: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "files": {k: str(v) for k, v in made.files.items()},
                "input_shape": made.input_shape,
                "input_dtype": made.input_dtype,
                "parameters": len(made.parameters),
                "head": made.head,
                "max_abs_diff": made.max_abs_diff,
                "upload": made.upload_command(family=args.family),
            },
            indent=2,
        )
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from devices_agent.outbox import Outbox
    from devices_agent.state import AgentState

    state = AgentState(args.state_dir)
    creds = state.credentials()
    current = state.current()
    data = state.load()
    outbox = Outbox(state.outbox_path)
    print(
        json.dumps(
            {
                "enrolled": creds is not None,
                "device_id": creds.device_id if creds else None,
                "server_url": creds.server_url if creds else None,
                "current_version_id": current.version_id if current else None,
                "current_label": current.label if current else None,
                "last_good_version_id": state.last_good_version_id(),
                "installed_versions": state.installed_versions(),
                "deployment": data.get("deployment"),
                "last_report": data.get("deployment_report"),
                "seq": data.get("seq", 0),
                "outbox_pending": outbox.pending(),
                "outbox_dropped": outbox.counter("dropped"),
            },
            indent=2,
        )
    )
    outbox.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="flotilla-agent", description="Flotilla's device agent")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path)
    run.add_argument("--server")
    run.add_argument("--token")
    run.add_argument("--state-dir")
    run.add_argument("--name")
    run.add_argument("--tag", action="append")
    run.add_argument("--interval", type=float, default=None, help="override the server's heartbeat interval")
    run.add_argument("--no-websocket", action="store_true")
    run.add_argument(
        "--allow-insecure-http", action="store_true", help="accept an http:// server (a lab or test server)"
    )
    run.add_argument("--server-cert-sha256", default=None, help="pin the server's certificate (SHA-256)")
    run.add_argument(
        "--ca-file", type=Path, default=None, help="trust this CA bundle instead of the system's"
    )
    run.add_argument("--max-steps", type=int, default=None)
    run.set_defaults(func=_cmd_run)

    sim = sub.add_parser("simulate", help="simulate a fleet of agents in this process")
    sim.add_argument("--devices", type=int, required=True)
    sim.add_argument("--server", required=True)
    sim.add_argument("--token", required=True, help="an enrollment token with max_uses >= devices")
    sim.add_argument("--state-root")
    sim.add_argument("--dataset", choices=("digits", "activity"), default="digits")
    sim.add_argument("--processes", action="store_true", help="every board a flotilla-agent run process")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the data split")
    sim.add_argument("--interval", type=float, default=None)
    sim.add_argument("--slow-fraction", type=float, default=0.2)
    sim.add_argument("--slow-delay-ms", type=float, default=15.0)
    sim.add_argument("--threads", type=int, default=8)
    sim.add_argument("--inferences", type=int, default=8, help="inferences per device per cycle")
    sim.add_argument("--no-train", action="store_true", help="ignore federated training tasks")
    sim.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    sim.set_defaults(func=_cmd_simulate)

    pred = sub.add_parser("predict", help="a prediction from the running agent's local API")
    pred.add_argument(
        "--state-dir", default="", help="the agent's state directory (its socket is agent.sock)"
    )
    pred.add_argument("--socket", default="", help="the local API's socket path or http://127.0.0.1:PORT")
    pred.add_argument("--input", required=True, help="one example as JSON (nested lists); @file")
    pred.add_argument("--batch", action="store_true", help="the input is a batch of examples")
    pred.set_defaults(func=_cmd_predict)

    test = sub.add_parser("selftest", help="run a real inference (and a training step) on this board")
    test.add_argument("--train", action="store_true", help="also one training step with each backend")
    test.set_defaults(func=_cmd_selftest)

    bundle = sub.add_parser("bundle", help="turn a PyTorch model into an upload: program, weights, ONNX")
    bundle.add_argument(
        "--model", required=True, help="FILE.py:NAME or MODULE:NAME (nn.Module class or factory)"
    )
    bundle.add_argument("--weights", help="a safetensors state dict to load into the model first")
    bundle.add_argument("--input-shape", required=True, help="one example's shape, no batch: 3,64")
    bundle.add_argument("--input-dtype", default="float32", choices=("float32", "int64", "uint8"))
    bundle.add_argument("--head", help="personal head parameters, comma-separated (default: last layer)")
    bundle.add_argument("--opset", type=int, default=17)
    bundle.add_argument("--family", default="<family>", help="family id for the printed upload command")
    bundle.add_argument(
        "--out", required=True, help="directory for program.json, weights.safetensors, model.onnx"
    )
    bundle.set_defaults(func=_cmd_bundle)

    status = sub.add_parser("status", help="show the local state")
    status.add_argument("--state-dir", required=True)
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flotilla-agent`` and ``python -m devices_agent``."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"flotilla-agent: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

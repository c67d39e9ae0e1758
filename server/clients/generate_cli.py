"""charstream-generate: stream text from a charstream server to the terminal as it is written.

    charstream-generate --target localhost:50051 --prompt "ROMEO:" --max-chars 500 --temperature 0.8 --seed 1

Generated characters go to stdout, flushed as they arrive; the finish line and
errors go to stderr. --session ID continues a session; --session new creates
one and prints its id (to stderr) so that a later call can continue it.

Several replicas sharing sessions (charstream-serve --session-store redis://...):
repeat --target (or separate addresses with commas); calls then spread over
them with gRPC's round_robin policy (--lb-policy changes that).

    charstream-generate --target 10.0.0.1:50051 --target 10.0.0.2:50051 --prompt "ROMEO:"

A server with TLS and API keys: --tls-ca trusts its CA (--tls alone: the
system's roots), --tls-cert/--tls-key present a client certificate (mutual
TLS); the API key comes from CHARSTREAM_API_KEY (or --api-key).

    CHARSTREAM_API_KEY=... charstream-generate --target charstream.example:50051 --tls-ca ca.pem --prompt "ROMEO:"
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import grpc

from server.clients.client import (
    CharstreamClient,
    has_uri_scheme,
    targets_to_uri,
    tls_credentials,
)

DEFAULT_TARGET = "localhost:50051"
API_KEY_ENV = "CHARSTREAM_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charstream-generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", action="append", default=[],
        help=f"server address HOST:PORT or a gRPC target URI (default {DEFAULT_TARGET}); repeat it, or separate "
        "IP:PORT addresses with commas, to spread calls over several replicas",
    )
    parser.add_argument(
        "--lb-policy", default=None,
        help="gRPC load-balancing policy (round_robin, pick_first); default: round_robin with several "
        "targets, else gRPC's default (pick_first)",
    )
    parser.add_argument("--prompt", default="", help="text consumed before generating")
    parser.add_argument("--max-chars", type=int, default=500, help="characters to generate (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: the session's (1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely characters")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible text")
    parser.add_argument("--stop", action="append", default=[], help="stop after this string (repeatable)")
    parser.add_argument("--session", default="", help="session id to continue, or 'new' to create one")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    add_security_arguments(parser)
    return parser


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and API keys")
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root CAs")
    group.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting the CAs in this PEM bundle")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    # The default is read here but never shown: --help would print the secret.
    group.add_argument(
        "--api-key", metavar="SECRET", default=os.environ.get(API_KEY_ENV) or None,
        help=f"sent as 'authorization: Bearer SECRET'; default: ${API_KEY_ENV}. Prefer the environment "
        "variable: a flag is visible to other users in the process list",
    )


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials for the TLS flags given, None for a plaintext channel."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def resolve_target(values: Sequence[str], lb_policy: str | None) -> tuple[str, str | None]:
    """The gRPC target and load-balancing policy for the --target values given."""
    addresses: list[str] = []
    for value in values or [DEFAULT_TARGET]:
        # A target URI keeps its commas: "ipv4:a:1,b:2" is already one target for several servers.
        addresses.extend([value] if has_uri_scheme(value) else value.split(","))
    if len(addresses) > 1:
        return targets_to_uri(addresses), lb_policy or "round_robin"
    return addresses[0].strip(), lb_policy


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target, lb_policy = resolve_target(args.target, args.lb_policy)
    except ValueError as error:
        parser.error(f"--target: {error}")
    try:
        credentials = channel_credentials(args)
        client = CharstreamClient(target, credentials=credentials, lb_policy=lb_policy, api_key=args.api_key)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    out = sys.stdout
    with client:
        stream = None
        try:
            session_id = args.session
            if session_id == "new":
                session_id = client.create_session().id
                print(f"session {session_id}", file=sys.stderr, flush=True)
            if args.echo:
                out.write(args.prompt)
                out.flush()
            stream = client.generate(
                args.prompt, args.max_chars, session_id=session_id, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
            )
            for chunk in stream:
                out.write(chunk)
                out.flush()  # a person watches the text being written
        except KeyboardInterrupt:
            if stream is not None:
                stream.cancel()
            print("\n[cancelled]", file=sys.stderr)
            return 130
        except grpc.RpcError as error:
            print(f"\ncharstream-generate: error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    out.write("\n")
    print(f"[finish: {stream.finish_reason}, {stream.generated_chars} chars]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

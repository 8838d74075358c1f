"""safe-jax export: write a model as a diffusers folder that PyTorch users load directly."""

from __future__ import annotations

import sys

from launch.cli_errors import ArgumentParser, int_at_least, one_line_errors, output_dir


def main(argv: list[str] | None = None, prog: str = "safe-jax export") -> int:
    p = ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--model", required=True, help="a local diffusers folder, or a preset: tiny, sd15, sd21, sd21-base")
    p.add_argument("--out", type=output_dir, required=True,
                   help="the folder to write (checked writable before the model is loaded)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="initialisation seed, for presets")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    @one_line_errors(prog)
    def run() -> int:
        import jax.numpy as jnp

        from safe_jax.sampling.stable_diffusion import StableDiffusion

        pipe, params = StableDiffusion.from_pretrained(args.model, dtype=jnp.float32, seed=args.seed)
        out = pipe.save_pretrained(params, args.out, dtype=args.dtype)
        print(f"exported {args.model} to {out} ({args.dtype})", file=sys.stderr)
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())

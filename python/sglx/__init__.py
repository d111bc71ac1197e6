"""sglx: an LLM serving engine in the style of SGLang."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import sglx` (and the CLIs' --help) stay fast and torch-free.
    if name == "Engine":
        from sglx.srt.entrypoints.engine import Engine

        return Engine
    raise AttributeError(name)

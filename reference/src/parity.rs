//! Parity with Hugging Face transformers: exports a reference module's weights, inputs
//! and output (safetensors + a JSON description) and runs `reference/parity/parity.py`.

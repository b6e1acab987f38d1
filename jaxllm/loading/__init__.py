"""Reading models from files: GGUF (llama.cpp, ollama) and Hugging Face folders."""

"""GGUF header -> model inventory: what the file holds, refused before llama.cpp could abort on it."""

"""Everything that touches llama.cpp: devices, the loader that applies a Plan, the patch's API, the recorder."""

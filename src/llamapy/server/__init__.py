"""The HTTP server: OpenAI- and llama.cpp-compatible endpoints (FastAPI + uvicorn)."""

"""The core server: the service behind the gateway on the core node (ingest, hybrid retrieval per
department, RAG with a response cache, embeddings). See `app.py` for the API."""

"""A finished run in use: loading its exports (`runs`), sampling (`python -m rlhf.deploy.generate`),
an HTTP server (`python -m rlhf.deploy.serve`) and the model cards written beside each export."""

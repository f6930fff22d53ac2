# Every target is one line; the scripts hold the logic. `make help` lists them.
V := .venv/bin

.PHONY: help venv run check test migrate bench chaos test-vllm bench-affinity

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | awk -F':.*## ' '{ printf "  make %-15s %s\n", $$1, $$2 }'

venv: ## create or update .venv (compiles llama.cpp once; no-op when up to date)
	@scripts/setup-venv

run: ## start everything on the embedded defaults and print where to look
	@scripts/setup-venv && $(V)/parley run

check: venv ## format check, lint, types, import contracts
	$(V)/ruff format --check . && $(V)/ruff check . && $(V)/mypy . && $(V)/lint-imports

test: ## chromium if missing, check, then every test tier
	@scripts/test

migrate: venv ## apply database migrations (DATABASE_URL, or the embedded Postgres)
	$(V)/parley migrate

bench: venv ## ingest, pipeline-overhead and database-scale benchmarks (never in CI)
	$(V)/python -m bench.ingest && $(V)/python -m bench.pipeline && $(V)/python -m bench.db_scale
chaos: venv ## fault run: 10,000 deliveries while workers, Redis and Postgres are killed (about 15 min)
	$(V)/python -m bench.chaos --full
test-vllm: ## the integration suite against two real vLLM servers on CPU (never in CI; 5-10 min warm)
	@scripts/test-vllm
bench-affinity: ## routing benchmark on two real vLLM servers: round robin, vllm-router, Parley (~25 min)
	@scripts/test-vllm --prepare && $(V)/python -m bench.affinity

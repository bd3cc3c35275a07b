"""Human feedback: diverse candidates -> a labelling web app -> agreement -> training data.

    alignkit label generate --prompts prompts.jsonl --models smollm2-135m-instruct,runs/dpo/final \
        --candidates 4 --diversity nc --out tasks.jsonl
    alignkit label add-annotator alice --db feedback.sqlite
    alignkit label serve --db feedback.sqlite --tasks tasks.jsonl
    alignkit label export --db feedback.sqlite --format dpo --out pairs.jsonl

Modules: `tasks` (the tasks file), `generate` (candidates, negatively-correlated sampling, diversity),
`store` (SQLite, WAL, schema version), `app` (FastAPI routes and templates), `report` (agreement,
leaderboard, rating distributions), `export` (dpo / rm / kto / ratings rows). See docs/feedback.md.
"""

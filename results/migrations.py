"""The results store's schema as named migrations (``edgequant.results.store`` applies them in order and
records each by name; a database that holds a name this list lacks is from a newer edgequant and refused)."""

from __future__ import annotations

# Named, append-only: never edit or reorder an entry, only add new ones.
MIGRATIONS: list[tuple[str, str]] = [
    ("001_runs_and_measurements", """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            started_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'partial', 'failed')),
            status_detail TEXT,
            command TEXT NOT NULL,
            profile TEXT,
            model_id TEXT,
            model_hash TEXT,
            edgequant_version TEXT NOT NULL,
            hostname TEXT NOT NULL,
            pid INTEGER NOT NULL,
            prep_seconds REAL
        );
        CREATE TABLE artifacts (
            sha256 TEXT PRIMARY KEY,
            model_hash TEXT NOT NULL,
            quant TEXT NOT NULL,
            format TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            n_params INTEGER NOT NULL,
            bits_per_weight REAL NOT NULL,
            tensor_types TEXT NOT NULL,
            cache_key TEXT NOT NULL,
            path TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE measurements (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            model_id TEXT NOT NULL,
            model_hash TEXT NOT NULL,
            quant TEXT NOT NULL,
            artifact_sha256 TEXT NOT NULL,
            is_reference INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            device TEXT NOT NULL,
            runtime TEXT NOT NULL,
            runtime_version TEXT NOT NULL,
            params TEXT NOT NULL,
            metric TEXT NOT NULL,
            value REAL NOT NULL,
            stddev REAL,
            repetitions INTEGER,
            unit TEXT NOT NULL,
            measured_at REAL NOT NULL
        );
        CREATE INDEX measurements_run ON measurements(run_id);
        CREATE INDEX measurements_key ON measurements(model_hash, quant, device_id, metric);
        CREATE TABLE rung_status (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            quant TEXT NOT NULL,
            device_id TEXT NOT NULL,
            status TEXT NOT NULL,
            detail TEXT,
            PRIMARY KEY (run_id, quant, device_id)
        );
    """),
    ("002_quality_detail_and_cases", """
        ALTER TABLE measurements ADD COLUMN detail TEXT;
        CREATE TABLE eval_cases (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            quant TEXT NOT NULL,
            device_id TEXT NOT NULL,
            suite TEXT NOT NULL,
            case_id TEXT NOT NULL,
            format TEXT NOT NULL,
            ok INTEGER NOT NULL,
            refusal INTEGER NOT NULL,
            reason TEXT,
            fields TEXT NOT NULL,
            output TEXT NOT NULL,
            stopped TEXT,
            n_tokens INTEGER,
            PRIMARY KEY (run_id, quant, device_id, case_id)
        );
    """),
    ("003_tags_and_run_indexes", """
        CREATE TABLE tags (
            name TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            tagged_at REAL NOT NULL
        );
        CREATE INDEX runs_started ON runs(started_at);
        CREATE INDEX runs_status_started ON runs(status, started_at);
    """),
    ("004_calibration_splits", """
        CREATE TABLE calibration_splits (
            split_sha256 TEXT NOT NULL,
            suite TEXT NOT NULL,
            suite_sha256 TEXT NOT NULL,
            case_id TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('calibration', 'evaluation')),
            PRIMARY KEY (split_sha256, case_id)
        );
    """),
    ("005_noise_floors", """
        CREATE TABLE noise_floors (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device_id TEXT NOT NULL,
            quant TEXT NOT NULL,
            artifact_sha256 TEXT NOT NULL,
            metric TEXT NOT NULL,
            floor_pct REAL NOT NULL,
            n_runs INTEGER NOT NULL,
            medians TEXT NOT NULL,
            params TEXT NOT NULL,
            measured_at REAL NOT NULL
        );
        CREATE INDEX noise_floors_place ON noise_floors(device_id, metric, measured_at);
    """),
    ("006_run_heartbeat", """
        ALTER TABLE runs ADD COLUMN heartbeat_at REAL;
    """),
    # stage and place as columns (``stage_of``/``place_of``: the same rule, for new rows); old rows back-filled
    ("007_s15p_stage_place", """
        ALTER TABLE measurements ADD COLUMN stage TEXT NOT NULL DEFAULT 'bench';
        ALTER TABLE measurements ADD COLUMN place TEXT NOT NULL DEFAULT 'host';
        UPDATE measurements SET stage = COALESCE(json_extract(params, '$.stage'), 'bench'),
            place = CASE WHEN json_extract(params, '$.runner') = 'device'
                              OR json_extract(params, '$.where') = 'device' THEN 'device' ELSE 'host' END;
        CREATE INDEX measurements_stage_place ON measurements(run_id, stage, place);
    """),
    # one row per stage a run ran or reused (conversion, each quantization, each benchmark process, the
    # eval's reference, generation and teacher processes): its peak RSS and time (edgequant.estimate)
    ("008_s19r_stage_resources", """
        CREATE TABLE stage_resources (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            stage TEXT NOT NULL,
            quant TEXT NOT NULL,
            device_id TEXT NOT NULL,
            n_params INTEGER,
            seconds REAL,
            peak_rss_bytes REAL,
            status TEXT NOT NULL,
            reused INTEGER NOT NULL DEFAULT 0,
            detail TEXT,
            measured_at REAL NOT NULL
        );
        CREATE INDEX stage_resources_run ON stage_resources(run_id, id);
        CREATE INDEX stage_resources_place ON stage_resources(device_id, stage, measured_at);
    """),
    # the bytes a stage moved: a push to a phone, the bytes sent (0: the phone held them already)
    ("009_s19r_stage_bytes", """
        ALTER TABLE stage_resources ADD COLUMN data_bytes REAL;
    """),
]

"""Schema migrations, applied in order; PRAGMA user_version (SQLite) or the
schema_version table (PostgreSQL) records the last one.

One script serves both databases: write SQLite DDL with the types TEXT,
INTEGER, REAL and BLOB (store/postgres.py maps them to TEXT, BIGINT, DOUBLE
PRECISION and BYTEA, `INTEGER PRIMARY KEY AUTOINCREMENT` to an identity
column, and drops `WITHOUT ROWID`); `ALTER TABLE ... ADD COLUMN` and
`CREATE INDEX` work on both."""

MIGRATIONS: tuple[str, ...] = (
    # 1: projects, keys, tasks, records
    """
    CREATE TABLE projects (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        webhook_url TEXT,
        webhook_events TEXT NOT NULL DEFAULT '[]',
        webhook_secret TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects(id),
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        balance INTEGER,              -- NULL: unmetered
        revoked_at REAL,
        created_at REAL NOT NULL
    );
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects(id),
        key_id TEXT NOT NULL REFERENCES api_keys(id),
        kind TEXT NOT NULL,
        url TEXT NOT NULL,
        params TEXT NOT NULL,         -- JSON of the accepted request
        state TEXT NOT NULL,          -- starting | running | stopped
        final_status INTEGER,
        final_message TEXT,
        segments INTEGER NOT NULL DEFAULT 0,
        flagged_segments INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        reconnects INTEGER NOT NULL DEFAULT 0,
        next_seq INTEGER NOT NULL DEFAULT 0,
        timeline_end REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        stopped_at REAL
    );
    CREATE INDEX tasks_project ON tasks(project_id, created_at);
    CREATE INDEX tasks_state ON tasks(state);
    CREATE TABLE records (
        task_id TEXT NOT NULL REFERENCES tasks(id),
        seq INTEGER NOT NULL,         -- segment_index; terminal records take the next one
        status INTEGER NOT NULL,
        body BLOB NOT NULL,           -- the record JSON exactly as delivered
        created_at REAL NOT NULL,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID;
    CREATE INDEX records_created ON records(created_at);
    """,
    # 2: the delivery outbox (records and events, written with what they report)
    """
    CREATE TABLE deliveries (
        n INTEGER PRIMARY KEY AUTOINCREMENT,   -- global order; per stream_key it is the delivery order
        id TEXT NOT NULL UNIQUE,
        event_id TEXT NOT NULL,                -- webhook-id: the same on every attempt
        project_id TEXT NOT NULL,
        task_id TEXT,
        url TEXT NOT NULL,
        stream_key TEXT NOT NULL,              -- ordering scope: one task at one destination
        event TEXT NOT NULL,
        body BLOB NOT NULL,
        status TEXT NOT NULL,                  -- pending | delivered | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        last_status_code INTEGER,
        created_at REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX deliveries_head ON deliveries(stream_key, status, n);
    CREATE INDEX deliveries_due ON deliveries(status, next_attempt_at);
    CREATE INDEX deliveries_project ON deliveries(project_id, status, n);
    ALTER TABLE projects ADD COLUMN previous_secret TEXT;
    ALTER TABLE projects ADD COLUMN previous_secret_expires_at REAL;
    """,
    # 3: file jobs. A job is a `tasks` row (kind 'job': records, charging and the
    # outbox are shared with live tasks) plus this side table; the queue is
    # `status` PENDING/PROCESSING in created order.
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY REFERENCES tasks(id),
        status TEXT NOT NULL,                  -- PENDING | PROCESSING | COMPLETED | FAILED | CANCELLED
        progress REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,   -- runs started (a restart runs a PROCESSING job again)
        input_path TEXT,                       -- an uploaded input, kept until the job ends
        outputs TEXT,                          -- JSON list of the renditions produced
        duration REAL,
        summary TEXT,                          -- JSON: the job-level moderation summary
        video_tokens INTEGER NOT NULL DEFAULT 0,
        text_tokens INTEGER NOT NULL DEFAULT 0,
        error_code TEXT,
        error_message TEXT,
        completed_at REAL
    );
    CREATE INDEX jobs_queue ON jobs(status);
    """,
    # 4: standalone, synchronous moderation and categorization jobs (issue 11)
    """
    CREATE TABLE standalone_jobs (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects(id),
        key_id TEXT NOT NULL REFERENCES api_keys(id),
        kind TEXT NOT NULL,            -- moderation | categorization
        status TEXT NOT NULL,          -- PROCESSING | COMPLETED | FAILED
        body BLOB NOT NULL,            -- the job as the API shows it (JSON)
        tokens INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX standalone_jobs_project ON standalone_jobs(project_id, kind, created_at);
    """,
    # 5: frame-level alerts of live tasks (issue 15): the `stream.alert` events as
    # listed by GET /v1/alerts; `n` is the list's `after` cursor.
    """
    CREATE TABLE alerts (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        project_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        category TEXT NOT NULL,
        time REAL NOT NULL,            -- timeline seconds of the frame
        body BLOB NOT NULL,            -- the event's data (StreamAlert JSON)
        created_at REAL NOT NULL
    );
    CREATE INDEX alerts_project ON alerts(project_id, n);
    CREATE INDEX alerts_task ON alerts(task_id, n);
    CREATE INDEX alerts_created ON alerts(created_at);
    """,
    # 6: S3 output (issue 13): a project's default and a job's own, as JSON
    # whose secret key is sealed (secretbox: encrypted at rest)
    """
    ALTER TABLE projects ADD COLUMN storage TEXT;
    ALTER TABLE jobs ADD COLUMN storage TEXT;
    """,
    # 7: the logo gallery (issue 12). Reference images live on disk under the
    # data dir (so their embeddings can be recomputed for a new model); their
    # embeddings (all augmented views, float32 rows) are cached per model
    # fingerprint.
    """
    CREATE TABLE logos (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects(id),
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (project_id, name)
    );
    CREATE TABLE logo_images (
        id TEXT PRIMARY KEY,
        logo_id TEXT NOT NULL REFERENCES logos(id) ON DELETE CASCADE,
        path TEXT NOT NULL,            -- relative to the data dir
        created_at REAL NOT NULL
    );
    CREATE INDEX logo_images_logo ON logo_images(logo_id, created_at);
    CREATE TABLE logo_embeddings (
        image_id TEXT NOT NULL REFERENCES logo_images(id) ON DELETE CASCADE,
        fingerprint TEXT NOT NULL,     -- the model's (ClipModel.fingerprint)
        dim INTEGER NOT NULL,
        embeddings BLOB NOT NULL,      -- float32 [views, dim]
        PRIMARY KEY (image_id, fingerprint)
    );
    """,
    # 8: scale-out (issue 14). Task ownership: the node that runs a live task
    # or a job, the epoch of its claim (fencing token) and its lease; the
    # nodes of a cluster with their capacity; delivery claims (one sender per
    # stream across nodes).
    """
    ALTER TABLE tasks ADD COLUMN node TEXT;
    ALTER TABLE tasks ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN lease_until REAL;
    ALTER TABLE tasks ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;   -- capacity slots (live tasks)
    CREATE INDEX tasks_owner ON tasks(node, state);
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        max_tasks INTEGER NOT NULL,
        job_slots INTEGER NOT NULL,
        heartbeat_at REAL NOT NULL,
        started_at REAL NOT NULL
    );
    ALTER TABLE deliveries ADD COLUMN claimed_by TEXT;
    ALTER TABLE deliveries ADD COLUMN claimed_until REAL;
    """,
)

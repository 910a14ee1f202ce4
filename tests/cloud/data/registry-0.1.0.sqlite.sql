-- The registry schema of edgefl-fleet 0.1.0 (main at ac977d0, before migrations):
-- the DDL that Base.metadata.create_all emitted on sqlite, captured with
-- sqlalchemy.create_mock_engine. tests/cloud/test_registry_migrations.py upgrades it.

CREATE TABLE runs (
	id INTEGER NOT NULL,
	flower_run_id VARCHAR(64),
	num_rounds INTEGER NOT NULL,
	strategy VARCHAR(64) NOT NULL,
	config_json TEXT NOT NULL,
	status VARCHAR(16) NOT NULL,
	started_at FLOAT NOT NULL,
	finished_at FLOAT,
	PRIMARY KEY (id)
);

CREATE TABLE artifacts (
	sha256 VARCHAR(64) NOT NULL,
	size BIGINT NOT NULL,
	data BLOB NOT NULL,
	created_at FLOAT NOT NULL,
	PRIMARY KEY (sha256)
);

CREATE TABLE round_replies (
	run_id INTEGER NOT NULL,
	round INTEGER NOT NULL,
	device_id VARCHAR(128) NOT NULL,
	ok BOOLEAN NOT NULL,
	num_examples INTEGER NOT NULL,
	metrics_json TEXT NOT NULL,
	error TEXT NOT NULL,
	received_at FLOAT NOT NULL,
	PRIMARY KEY (run_id, round, device_id)
);

CREATE TABLE devices (
	device_id VARCHAR(128) NOT NULL,
	fleet VARCHAR(128) NOT NULL,
	serving_version INTEGER NOT NULL,
	state VARCHAR(16) NOT NULL,
	timestamp_ms BIGINT NOT NULL,
	received_at FLOAT NOT NULL,
	last_round_trained INTEGER NOT NULL,
	sample_count BIGINT NOT NULL,
	cpu_percent FLOAT NOT NULL,
	rss_bytes BIGINT NOT NULL,
	disk_free_bytes BIGINT NOT NULL,
	memory_available_bytes BIGINT NOT NULL,
	profile VARCHAR(128) NOT NULL,
	last_error TEXT NOT NULL,
	last_metrics_json TEXT NOT NULL,
	edgefl_version VARCHAR(64) NOT NULL,
	PRIMARY KEY (device_id)
);

CREATE TABLE events (
	id INTEGER NOT NULL,
	device_id VARCHAR(128) NOT NULL,
	timestamp_ms BIGINT NOT NULL,
	kind VARCHAR(64) NOT NULL,
	detail TEXT NOT NULL,
	version INTEGER NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_events_device_id ON events (device_id);

CREATE TABLE meta (
	"key" VARCHAR(64) NOT NULL,
	value INTEGER NOT NULL,
	PRIMARY KEY ("key")
);

CREATE TABLE versions (
	version INTEGER NOT NULL,
	artifact_sha256 VARCHAR(64) NOT NULL,
	architecture_id VARCHAR(128) NOT NULL,
	round INTEGER NOT NULL,
	run_id INTEGER,
	parent_version INTEGER,
	metrics_json TEXT NOT NULL,
	participants_json TEXT NOT NULL,
	created_at FLOAT NOT NULL,
	PRIMARY KEY (version),
	CONSTRAINT uq_versions_run_round UNIQUE (run_id, round),
	FOREIGN KEY(artifact_sha256) REFERENCES artifacts (sha256),
	FOREIGN KEY(run_id) REFERENCES runs (id)
);

CREATE TABLE rounds (
	run_id INTEGER NOT NULL,
	round INTEGER NOT NULL,
	sampled_json TEXT NOT NULL,
	started_at FLOAT,
	finished_at FLOAT,
	aggregated_metrics_json TEXT NOT NULL,
	eval_metrics_json TEXT NOT NULL,
	version INTEGER,
	dropped_json TEXT NOT NULL,
	PRIMARY KEY (run_id, round),
	FOREIGN KEY(run_id) REFERENCES runs (id)
);

CREATE TABLE serving (
	id INTEGER NOT NULL,
	version INTEGER NOT NULL,
	pinned BOOLEAN NOT NULL,
	sequence INTEGER NOT NULL,
	updated_at FLOAT NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(version) REFERENCES versions (version)
);

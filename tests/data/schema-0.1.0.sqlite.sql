-- merger 0.1.0, the release before migrations: Base.metadata.create_all on SQLite (sqlite3 .schema)
CREATE TABLE models (
	id VARCHAR(64) NOT NULL, 
	name VARCHAR(200), 
	kind VARCHAR(20) NOT NULL, 
	location VARCHAR(4096), 
	architecture VARCHAR(200), 
	size_bytes BIGINT NOT NULL, 
	created_at DATETIME NOT NULL, 
	recipe JSON, 
	recipe_digest VARCHAR(64), 
	versions JSON, 
	origin JSON, 
	public BOOLEAN NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_models_name ON models (name);
CREATE TABLE users (
	name VARCHAR(100) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE model_files (
	model_id VARCHAR(64) NOT NULL, 
	path VARCHAR(1024) NOT NULL, 
	size BIGINT NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	PRIMARY KEY (model_id, path), 
	FOREIGN KEY(model_id) REFERENCES models (id) ON DELETE CASCADE
);
CREATE TABLE edges (
	id INTEGER NOT NULL, 
	child_id VARCHAR(64) NOT NULL, 
	parent_id VARCHAR(64) NOT NULL, 
	relation VARCHAR(20) NOT NULL, 
	role VARCHAR(20) NOT NULL, 
	weight FLOAT, 
	position INTEGER NOT NULL, 
	details JSON, 
	PRIMARY KEY (id), 
	FOREIGN KEY(child_id) REFERENCES models (id) ON DELETE CASCADE, 
	FOREIGN KEY(parent_id) REFERENCES models (id)
);
CREATE INDEX ix_edges_parent_id ON edges (parent_id);
CREATE INDEX ix_edges_child_id ON edges (child_id);
CREATE TABLE recipe_cache (
	"key" VARCHAR(64) NOT NULL, 
	model_id VARCHAR(64) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY ("key"), 
	FOREIGN KEY(model_id) REFERENCES models (id) ON DELETE CASCADE
);
CREATE TABLE runs (
	id INTEGER NOT NULL, 
	stage VARCHAR(200) NOT NULL, 
	cache_key VARCHAR(64) NOT NULL, 
	model_id VARCHAR(64) NOT NULL, 
	cache_hit BOOLEAN NOT NULL, 
	seconds FLOAT NOT NULL, 
	finished_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(model_id) REFERENCES models (id) ON DELETE CASCADE
);
CREATE INDEX ix_runs_cache_key ON runs (cache_key);
CREATE TABLE evaluations (
	cache_key VARCHAR(64) NOT NULL, 
	model_id VARCHAR(64) NOT NULL, 
	metric VARCHAR(40) NOT NULL, 
	dataset VARCHAR(1024) NOT NULL, 
	dataset_sha256 VARCHAR(64) NOT NULL, 
	"limit" INTEGER, 
	settings JSON NOT NULL, 
	runtime VARCHAR(40) NOT NULL, 
	"values" JSON NOT NULL, 
	tokens_per_second FLOAT, 
	seconds FLOAT NOT NULL, 
	versions JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (cache_key), 
	FOREIGN KEY(model_id) REFERENCES models (id) ON DELETE CASCADE
);
CREATE INDEX ix_evaluations_model_id ON evaluations (model_id);
CREATE TABLE tokens (
	sha256 VARCHAR(64) NOT NULL, 
	user VARCHAR(100) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (sha256), 
	FOREIGN KEY(user) REFERENCES users (name) ON DELETE CASCADE
);
CREATE INDEX ix_tokens_user ON tokens (user);
CREATE TABLE model_grants (
	model_id VARCHAR(64) NOT NULL, 
	user VARCHAR(100) NOT NULL, 
	owner BOOLEAN NOT NULL, 
	PRIMARY KEY (model_id, user), 
	FOREIGN KEY(model_id) REFERENCES models (id) ON DELETE CASCADE, 
	FOREIGN KEY(user) REFERENCES users (name) ON DELETE CASCADE
);
CREATE TABLE jobs (
	id VARCHAR(32) NOT NULL, 
	owner VARCHAR(100) NOT NULL, 
	state VARCHAR(20) NOT NULL, 
	recipe JSON NOT NULL, 
	recipe_name VARCHAR(200) NOT NULL, 
	force BOOLEAN NOT NULL, 
	queue VARCHAR(20) NOT NULL, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	stage VARCHAR(200), 
	done INTEGER NOT NULL, 
	total INTEGER NOT NULL, 
	model_id VARCHAR(64), 
	error_code VARCHAR(40), 
	error_message VARCHAR(4000), 
	cancel_requested BOOLEAN NOT NULL, 
	attempts INTEGER NOT NULL, 
	worker VARCHAR(200), 
	lease_until DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(owner) REFERENCES users (name), 
	FOREIGN KEY(model_id) REFERENCES models (id)
);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_owner ON jobs (owner);

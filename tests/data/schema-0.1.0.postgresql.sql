-- merger 0.1.0, the release before migrations: Base.metadata.create_all on PostgreSQL (pg_dump --schema-only, settings lines removed)
CREATE TABLE public.edges (
    id integer NOT NULL,
    child_id character varying(64) NOT NULL,
    parent_id character varying(64) NOT NULL,
    relation character varying(20) NOT NULL,
    role character varying(20) NOT NULL,
    weight double precision,
    "position" integer NOT NULL,
    details json
);

COMMENT ON COLUMN public.edges.relation IS 'merge | adapter | quantized | finetune';

COMMENT ON COLUMN public.edges.role IS 'base | donor | adapter';

CREATE SEQUENCE public.edges_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.edges_id_seq OWNED BY public.edges.id;

CREATE TABLE public.evaluations (
    cache_key character varying(64) NOT NULL,
    model_id character varying(64) NOT NULL,
    metric character varying(40) NOT NULL,
    dataset character varying(1024) NOT NULL,
    dataset_sha256 character varying(64) NOT NULL,
    "limit" integer,
    settings json NOT NULL,
    runtime character varying(40) NOT NULL,
    "values" json NOT NULL,
    tokens_per_second double precision,
    seconds double precision NOT NULL,
    versions json NOT NULL,
    created_at timestamp with time zone NOT NULL
);

COMMENT ON COLUMN public.evaluations.cache_key IS 'sha256 of model id, metric, data, settings, runtime, versions';

COMMENT ON COLUMN public.evaluations.metric IS 'perplexity | task_accuracy | multiple_choice | lm_eval';

COMMENT ON COLUMN public.evaluations.dataset IS 'the data file as given (a label)';

COMMENT ON COLUMN public.evaluations.settings IS 'everything else that shapes the value: window, dtype';

COMMENT ON COLUMN public.evaluations.runtime IS 'transformers | transformers-gguf | llama.cpp';

CREATE TABLE public.jobs (
    id character varying(32) NOT NULL,
    owner character varying(100) NOT NULL,
    state character varying(20) NOT NULL,
    recipe json NOT NULL,
    recipe_name character varying(200) NOT NULL,
    force boolean NOT NULL,
    queue character varying(20) NOT NULL,
    created_at timestamp with time zone NOT NULL,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    stage character varying(200),
    done integer NOT NULL,
    total integer NOT NULL,
    model_id character varying(64),
    error_code character varying(40),
    error_message character varying(4000),
    cancel_requested boolean NOT NULL,
    attempts integer NOT NULL,
    worker character varying(200),
    lease_until timestamp with time zone
);

COMMENT ON COLUMN public.jobs.state IS 'queued | running | succeeded | failed | cancelled';

COMMENT ON COLUMN public.jobs.lease_until IS 'database lease (no Redis)';

CREATE TABLE public.model_files (
    model_id character varying(64) NOT NULL,
    path character varying(1024) NOT NULL,
    size bigint NOT NULL,
    sha256 character varying(64) NOT NULL
);

CREATE TABLE public.model_grants (
    model_id character varying(64) NOT NULL,
    "user" character varying(100) NOT NULL,
    owner boolean NOT NULL
);

COMMENT ON COLUMN public.model_grants.owner IS 'may change the model''s visibility';

CREATE TABLE public.models (
    id character varying(64) NOT NULL,
    name character varying(200),
    kind character varying(20) NOT NULL,
    location character varying(4096),
    architecture character varying(200),
    size_bytes bigint NOT NULL,
    created_at timestamp with time zone NOT NULL,
    recipe json,
    recipe_digest character varying(64),
    versions json,
    origin json,
    public boolean NOT NULL
);

COMMENT ON COLUMN public.models.id IS 'sha256 of the file manifest';

COMMENT ON COLUMN public.models.kind IS 'model | adapter';

COMMENT ON COLUMN public.models.location IS 'external directory; NULL = in the store';

COMMENT ON COLUMN public.models.recipe IS 'normalized stage recipe that produced it';

COMMENT ON COLUMN public.models.origin IS 'where an imported model came from';

COMMENT ON COLUMN public.models.public IS 'visible to every user of the service';

CREATE TABLE public.recipe_cache (
    key character varying(64) NOT NULL,
    model_id character varying(64) NOT NULL,
    created_at timestamp with time zone NOT NULL
);

COMMENT ON COLUMN public.recipe_cache.key IS 'sha256 of stage recipe + input ids + versions';

CREATE TABLE public.runs (
    id integer NOT NULL,
    stage character varying(200) NOT NULL,
    cache_key character varying(64) NOT NULL,
    model_id character varying(64) NOT NULL,
    cache_hit boolean NOT NULL,
    seconds double precision NOT NULL,
    finished_at timestamp with time zone NOT NULL
);

CREATE SEQUENCE public.runs_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.runs_id_seq OWNED BY public.runs.id;

CREATE TABLE public.tokens (
    sha256 character varying(64) NOT NULL,
    "user" character varying(100) NOT NULL,
    created_at timestamp with time zone NOT NULL
);

COMMENT ON COLUMN public.tokens.sha256 IS 'tokens are stored hashed';

CREATE TABLE public.users (
    name character varying(100) NOT NULL,
    created_at timestamp with time zone NOT NULL
);

ALTER TABLE ONLY public.edges ALTER COLUMN id SET DEFAULT nextval('public.edges_id_seq'::regclass);

ALTER TABLE ONLY public.runs ALTER COLUMN id SET DEFAULT nextval('public.runs_id_seq'::regclass);

ALTER TABLE ONLY public.edges
    ADD CONSTRAINT edges_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.evaluations
    ADD CONSTRAINT evaluations_pkey PRIMARY KEY (cache_key);

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.model_files
    ADD CONSTRAINT model_files_pkey PRIMARY KEY (model_id, path);

ALTER TABLE ONLY public.model_grants
    ADD CONSTRAINT model_grants_pkey PRIMARY KEY (model_id, "user");

ALTER TABLE ONLY public.models
    ADD CONSTRAINT models_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.recipe_cache
    ADD CONSTRAINT recipe_cache_pkey PRIMARY KEY (key);

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.tokens
    ADD CONSTRAINT tokens_pkey PRIMARY KEY (sha256);

ALTER TABLE ONLY public.users
    ADD CONSTRAINT users_pkey PRIMARY KEY (name);

CREATE INDEX ix_edges_child_id ON public.edges USING btree (child_id);

CREATE INDEX ix_edges_parent_id ON public.edges USING btree (parent_id);

CREATE INDEX ix_evaluations_model_id ON public.evaluations USING btree (model_id);

CREATE INDEX ix_jobs_owner ON public.jobs USING btree (owner);

CREATE INDEX ix_jobs_state ON public.jobs USING btree (state);

CREATE INDEX ix_models_name ON public.models USING btree (name);

CREATE INDEX ix_runs_cache_key ON public.runs USING btree (cache_key);

CREATE INDEX ix_tokens_user ON public.tokens USING btree ("user");

ALTER TABLE ONLY public.edges
    ADD CONSTRAINT edges_child_id_fkey FOREIGN KEY (child_id) REFERENCES public.models(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.edges
    ADD CONSTRAINT edges_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES public.models(id);

ALTER TABLE ONLY public.evaluations
    ADD CONSTRAINT evaluations_model_id_fkey FOREIGN KEY (model_id) REFERENCES public.models(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_model_id_fkey FOREIGN KEY (model_id) REFERENCES public.models(id);

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_owner_fkey FOREIGN KEY (owner) REFERENCES public.users(name);

ALTER TABLE ONLY public.model_files
    ADD CONSTRAINT model_files_model_id_fkey FOREIGN KEY (model_id) REFERENCES public.models(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.model_grants
    ADD CONSTRAINT model_grants_model_id_fkey FOREIGN KEY (model_id) REFERENCES public.models(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.model_grants
    ADD CONSTRAINT model_grants_user_fkey FOREIGN KEY ("user") REFERENCES public.users(name) ON DELETE CASCADE;

ALTER TABLE ONLY public.recipe_cache
    ADD CONSTRAINT recipe_cache_model_id_fkey FOREIGN KEY (model_id) REFERENCES public.models(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_model_id_fkey FOREIGN KEY (model_id) REFERENCES public.models(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.tokens
    ADD CONSTRAINT tokens_user_fkey FOREIGN KEY ("user") REFERENCES public.users(name) ON DELETE CASCADE;

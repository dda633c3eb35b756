-- The shared registry of a Holdfast deployment: several gateways, one client population.
-- Applied by every holdfast binary on connect (sqlx::migrate!, embedded at build time). Each
-- migration runs in one transaction, so an interrupted one leaves the previous schema intact.

-- The deployment's address plan: one row. Every gateway of the deployment serves this subnet,
-- so a client keeps its address whichever gateway it uses.
CREATE TABLE holdfast_deployment (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    subnet     cidr NOT NULL CHECK (family(subnet) = 4),
    gateway_ip inet NOT NULL CHECK (family(gateway_ip) = 4 AND gateway_ip << subnet),
    -- The IPv6 tunnel subnet, once IPv6 inside the tunnel exists (NULL: IPv4 only).
    subnet6    cidr NULL CHECK (subnet6 IS NULL OR family(subnet6) = 6),
    created    text NOT NULL
);

-- Every gateway of the deployment: clients receive the list of endpoints and fail over along it.
CREATE TABLE holdfast_gateways (
    endpoint text PRIMARY KEY,
    name     text NOT NULL,
    joined   text NOT NULL
);

-- The clients. Addresses are unique by constraint: two concurrent add-client runs can never
-- hand out one address twice, whatever the application does.
CREATE TABLE holdfast_clients (
    name        text PRIMARY KEY,
    ip          inet NOT NULL UNIQUE CHECK (family(ip) = 4 AND masklen(ip) = 32),
    -- The stable IPv6 tunnel address (NULL until IPv6 inside the tunnel exists).
    ip6         inet NULL UNIQUE CHECK (ip6 IS NULL OR (family(ip6) = 6 AND masklen(ip6) = 128)),
    state       text NOT NULL CHECK (state IN ('active', 'revoked')),
    cert_sha256 bytea NOT NULL CHECK (octet_length(cert_sha256) = 32),
    created     text NOT NULL,
    cert_issued text NOT NULL,
    revoked_at  text NULL
);

-- The registry's version: bumped by every change to clients or gateways, in the same
-- transaction, and announced on the channel `holdfast_registry` at commit. Gateways compare it
-- with their view's version as a safety net for notifications lost while their listener was away.
CREATE TABLE holdfast_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL
);
INSERT INTO holdfast_version (singleton, version) VALUES (true, 1);

CREATE FUNCTION holdfast_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE holdfast_version SET version = version + 1 RETURNING version INTO v;
    PERFORM pg_notify('holdfast_registry', v::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER holdfast_clients_changed
    AFTER INSERT OR UPDATE OR DELETE ON holdfast_clients
    FOR EACH STATEMENT EXECUTE FUNCTION holdfast_bump_version();
CREATE TRIGGER holdfast_gateways_changed
    AFTER INSERT OR UPDATE OR DELETE ON holdfast_gateways
    FOR EACH STATEMENT EXECUTE FUNCTION holdfast_bump_version();

-- Which gateway holds each client's live session (never the session or its key: those stay in
-- the memory of the gateway that made them). A claim gets a number from a sequence; the other
-- gateways hear `client gateway claim age_ms` on `holdfast_sessions` and drop their older session.
-- `opened_at` is when the session opened, on the database's clock (now() minus its age as the
-- gateway measured it): a claim for a session older than the recorded one is refused, so a
-- gateway that hung and comes back late cannot take a client over from the gateway it moved to.
CREATE SEQUENCE holdfast_claims;
CREATE TABLE holdfast_sessions (
    client    text PRIMARY KEY REFERENCES holdfast_clients (name) ON DELETE CASCADE,
    gateway   text NOT NULL,
    claim     bigint NOT NULL,
    opened_at timestamptz NOT NULL
);

CREATE FUNCTION holdfast_announce_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The claimed session's age in ms: a gateway ends only its sessions older than that.
    PERFORM pg_notify('holdfast_sessions', NEW.client || ' ' || NEW.gateway || ' ' || NEW.claim::text
        || ' ' || (extract(epoch FROM (now() - NEW.opened_at)) * 1000)::bigint::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER holdfast_sessions_claimed
    AFTER INSERT OR UPDATE ON holdfast_sessions
    FOR EACH ROW EXECUTE FUNCTION holdfast_announce_claim();

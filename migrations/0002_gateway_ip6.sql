-- The deployment's IPv6 tunnel address beside its IPv6 subnet (dual stack inside the tunnel):
-- every gateway of the deployment takes it, as it takes `gateway_ip`. NULL with `subnet6`.
-- A deployment that already has a `subnet6` gets its first host, the gateways' default.
ALTER TABLE holdfast_deployment
    ADD COLUMN gateway_ip6 inet NULL
        CHECK (gateway_ip6 IS NULL OR (family(gateway_ip6) = 6 AND gateway_ip6 << subnet6));
UPDATE holdfast_deployment
    SET gateway_ip6 = set_masklen(subnet6::inet + 1, 128)
    WHERE subnet6 IS NOT NULL;
ALTER TABLE holdfast_deployment
    ADD CONSTRAINT holdfast_deployment_v6_whole CHECK ((subnet6 IS NULL) = (gateway_ip6 IS NULL));

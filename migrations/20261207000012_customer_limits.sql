-- Per-customer limits (API.md, "Per-customer limit"): the most units of a product one customer
-- may hold or have bought (NULL: no limit). Written by the projections from the product records.
ALTER TABLE products ADD COLUMN max_per_customer INT UNSIGNED NULL;

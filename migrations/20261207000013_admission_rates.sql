-- Waiting rooms (API.md, "Waiting room"): buyers per second let through a product's queue to
-- checkout (NULL: no queue). Written by the projections from the product records (one node), and
-- by the shared catalogue's PUT (several nodes).
ALTER TABLE products ADD COLUMN admission_rate INT UNSIGNED NULL;

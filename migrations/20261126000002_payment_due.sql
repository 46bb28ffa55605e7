-- Money follows the order: what an order still owes the payment gateway ('capture', 'void',
-- 'refund'), NULL once the call is journaled. Orders with something due are loaded at start-up
-- whatever their age, so the settler finishes them.
ALTER TABLE orders ADD COLUMN payment_due VARCHAR(16) CHARACTER SET ascii NULL;
CREATE INDEX orders_payment_due ON orders (payment_due);

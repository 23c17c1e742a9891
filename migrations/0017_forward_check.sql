-- Every forward is checked against the owner it goes to, in the batch's own write. A partition
-- learns a contact's owner from a refused write (0007's CC004) and forwards the contact's
-- records there from then on; what it learnt can go stale: the owner's row was created by a
-- batch that a restore rolled back, and another partition created it since (an instance killed
-- mid-batch while a producer scatters a contact's intents over several partitions). Two
-- partitions whose stale owners named each other forwarded one record back and forth without
-- end, each copy a new record. So the batch's forwards are checked here, after its contacts
-- are written (the same statement, a later function: a contact created by this batch counts):
-- a forward to a partition that does not own the contact refuses the write with CC004, as a
-- write of a contact owned elsewhere does, the detail naming the real owner, or the
-- forwarding partition itself when no partition owns the contact any more (it decides the
-- contact from now on). Nothing of the batch is written; the engine learns and replays.
CREATE FUNCTION cc_check_forwards(
    f_part integer[], f_contact text[], f_owner integer[]
) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    bad text;
BEGIN
    IF coalesce(cardinality(f_part), 0) = 0 THEN
        RETURN;
    END IF;
    SELECT json_agg(json_build_object('partition', u.part, 'contact', u.contact,
                                      'owner', coalesce(c.partition, u.part))
                    ORDER BY u.part, u.contact)::text
      INTO bad
      FROM (SELECT DISTINCT x.part, x.contact, x.owner
              FROM unnest(f_part, f_contact, f_owner) AS x(part, contact, owner)) u
      LEFT JOIN cc_contact c ON c.contact_id = u.contact
     WHERE c.partition IS DISTINCT FROM u.owner;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'records of this batch were forwarded to a partition that does not own their contact'
            USING ERRCODE = 'CC004', DETAIL = bad;
    END IF;
END;
$$;

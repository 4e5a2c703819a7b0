/* Copyright 2026 the stral authors. Licensed under the Apache License, Version 2.0. */
/* A single-producer single-consumer lock-free ring buffer of fixed-size records. */

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    size_t capacity;      /* number of slots, a power of two */
    size_t record_size;   /* bytes per record */
    _Atomic size_t head;  /* next slot to read (consumer owns) */
    _Atomic size_t tail;  /* next slot to write (producer owns) */
    unsigned char *slots;
} ring_buffer;

static size_t next_pow2(size_t n) {
    size_t p = 1;
    while (p < n) {
        p <<= 1;
    }
    return p;
}

ring_buffer *ring_create(size_t capacity, size_t record_size) {
    if (capacity == 0 || record_size == 0) {
        return NULL;
    }
    ring_buffer *rb = calloc(1, sizeof(*rb));
    if (!rb) {
        return NULL;
    }
    rb->capacity = next_pow2(capacity);
    rb->record_size = record_size;
    rb->slots = calloc(rb->capacity, record_size);
    if (!rb->slots) {
        free(rb);
        return NULL;
    }
    atomic_init(&rb->head, 0);
    atomic_init(&rb->tail, 0);
    return rb;
}

void ring_destroy(ring_buffer *rb) {
    if (rb) {
        free(rb->slots);
        free(rb);
    }
}

size_t ring_len(const ring_buffer *rb) {
    size_t tail = atomic_load_explicit(&rb->tail, memory_order_acquire);
    size_t head = atomic_load_explicit(&rb->head, memory_order_acquire);
    return tail - head;
}

bool ring_push(ring_buffer *rb, const void *record) {
    size_t tail = atomic_load_explicit(&rb->tail, memory_order_relaxed);
    size_t head = atomic_load_explicit(&rb->head, memory_order_acquire);
    if (tail - head == rb->capacity) {
        return false; /* full */
    }
    size_t slot = tail & (rb->capacity - 1);
    memcpy(rb->slots + slot * rb->record_size, record, rb->record_size);
    atomic_store_explicit(&rb->tail, tail + 1, memory_order_release);
    return true;
}

bool ring_pop(ring_buffer *rb, void *record) {
    size_t head = atomic_load_explicit(&rb->head, memory_order_relaxed);
    size_t tail = atomic_load_explicit(&rb->tail, memory_order_acquire);
    if (head == tail) {
        return false; /* empty */
    }
    size_t slot = head & (rb->capacity - 1);
    memcpy(record, rb->slots + slot * rb->record_size, rb->record_size);
    atomic_store_explicit(&rb->head, head + 1, memory_order_release);
    return true;
}

#ifdef RING_BUFFER_DEMO
#include <stdio.h>

int main(void) {
    ring_buffer *rb = ring_create(4, sizeof(int));
    for (int i = 0; i < 6; i++) {
        printf("push %d -> %s\n", i, ring_push(rb, &i) ? "ok" : "full");
    }
    int v;
    while (ring_pop(rb, &v)) {
        printf("pop %d\n", v);
    }
    ring_destroy(rb);
    return 0;
}
#endif

// Copyright 2026 the stral authors. Licensed under the Apache License, Version 2.0.

// Package pool runs jobs on a bounded set of goroutines with cancellation.
package pool

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Job is one unit of work; it must return when ctx is cancelled.
type Job func(ctx context.Context) (any, error)

// Result pairs a job's index with what it returned.
type Result struct {
	Index    int
	Value    any
	Err      error
	Duration time.Duration
}

// ErrClosed is returned by Submit after Close.
var ErrClosed = errors.New("pool: closed")

// Pool runs submitted jobs on at most Workers goroutines.
type Pool struct {
	jobs    chan indexedJob
	results chan Result
	wg      sync.WaitGroup
	mu      sync.Mutex
	closed  bool
	next    int
}

type indexedJob struct {
	index int
	job   Job
}

// New starts a pool with the given number of workers and queue depth.
func New(ctx context.Context, workers, queue int) *Pool {
	if workers < 1 {
		workers = 1
	}
	p := &Pool{
		jobs:    make(chan indexedJob, queue),
		results: make(chan Result, queue),
	}
	for i := 0; i < workers; i++ {
		p.wg.Add(1)
		go p.worker(ctx)
	}
	go func() {
		p.wg.Wait()
		close(p.results)
	}()
	return p
}

func (p *Pool) worker(ctx context.Context) {
	defer p.wg.Done()
	for ij := range p.jobs {
		start := time.Now()
		v, err := ij.job(ctx)
		p.results <- Result{Index: ij.index, Value: v, Err: err, Duration: time.Since(start)}
	}
}

// Submit queues a job and returns its index.
func (p *Pool) Submit(job Job) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return 0, ErrClosed
	}
	idx := p.next
	p.next++
	p.jobs <- indexedJob{index: idx, job: job}
	return idx, nil
}

// Close stops accepting jobs; Results is closed once the queued ones finish.
func (p *Pool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.closed = true
		close(p.jobs)
	}
}

// Results streams results in completion order.
func (p *Pool) Results() <-chan Result {
	return p.results
}

// Collect closes the pool and returns all results ordered by index.
func (p *Pool) Collect() []Result {
	p.Close()
	var out []Result
	for r := range p.results {
		out = append(out, r)
	}
	ordered := make([]Result, len(out))
	for _, r := range out {
		ordered[r.Index] = r
	}
	return ordered
}
